import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvpass
from kvpass import MHC, Full, Policy, SharedKV, Sparse, Window


def test_selectors():
    p = Policy(default=Window(size=64, sinks=2),
               layers={3: Full(), "5-7": SharedKV(kv_heads=1), "10-": [SharedKV(ratio=2), Window(32, 0)],
                       "*.layers.4.*": MHC(rank=16)})
    assert p.forms_for(3, "m.layers.3.attn") == (Full(),)
    assert p.forms_for(6, "m.layers.6.attn") == (SharedKV(kv_heads=1),)
    assert p.forms_for(12, "m.layers.12.attn") == (SharedKV(ratio=2), Window(32, 0))
    assert p.forms_for(4, "m.layers.4.attn") == (MHC(rank=16),)
    assert p.forms_for(0, "m.layers.0.attn") == (Window(size=64, sinks=2),)
    assert Policy.of(Full()) == Policy()


forms = st.one_of(
    st.just(Full()),
    st.builds(SharedKV, kv_heads=st.integers(1, 8)),
    st.builds(MHC, rank=st.integers(1, 512)),
    st.builds(Window, size=st.integers(1, 4096), sinks=st.integers(0, 8)),
    st.builds(Sparse, block=st.sampled_from([16, 64]), local=st.integers(1, 4), random=st.integers(0, 3)),
)


@given(default=forms, layers=st.dictionaries(st.one_of(st.integers(0, 40), st.sampled_from(["2-5", "8-"])),
                                              forms, max_size=4))
def test_json_and_yaml_round_trip(tmp_path_factory, default, layers):
    p = Policy(default=default, layers=layers)
    d = tmp_path_factory.mktemp("p")
    for suffix in (".json", ".yaml"):
        p.to_file(d / f"p{suffix}")
        assert Policy.from_file(d / f"p{suffix}") == p


@pytest.mark.parametrize("bad,field", [
    (lambda: Window(size=0), "Window.size"),
    (lambda: Window(size=8, sinks=-1), "Window.sinks"),
    (lambda: SharedKV(kv_heads=2, grouping="random"), "SharedKV.grouping"),
    (lambda: SharedKV(), "kv_heads"),
    (lambda: MHC(rank=8, method="pca"), "MHC.method"),
    (lambda: Policy(layers={"": Full()}), "selector"),
    (lambda: Policy(default=[Full(), Window()]), "cannot be composed"),
])
def test_validation_names_the_field(bad, field):
    with pytest.raises(kvpass.PolicyError, match=field):
        bad()


@pytest.mark.parametrize("doc,field", [
    ({"version": 1, "default": [{"kind": "window", "size": "big"}]}, "Window.size"),
    ({"version": 1, "default": [{"kind": "wndow"}]}, "form.kind"),
    ({"version": 1, "default": [{"kind": "window", "sise": 3}]}, "unknown field"),
    ({"default": [{"kind": "full"}]}, "policy.version"),
    ({"version": 7, "default": [{"kind": "full"}]}, "Policy.version"),
])
def test_malformed_policy_file_names_the_field(tmp_path, doc, field):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(kvpass.PolicyError, match=field):
        Policy.from_file(path)


def test_unparseable_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("default: [unclosed")
    with pytest.raises(kvpass.PolicyError, match="not valid yaml"):
        Policy.from_file(path)


def test_selectors_that_match_no_layer_are_errors():
    """A typo in a selector would leave its layers at the default, silently (issue 24)."""
    import families as fam

    model = fam.build("llama")  # 2 layers
    for sel in ("50", "*.layers.9.self_attn", "0 - 1", 7):
        with pytest.raises(kvpass.PolicyError, match="match no attention layer"):
            kvpass.optimize(model, kvpass.Policy(default=kvpass.Full(), layers={sel: kvpass.Window(4)}))
    fast = kvpass.optimize(model)
    with pytest.raises(kvpass.PolicyError, match=r"\['9-'\] match no attention layer.*layers 0-1"):
        kvpass.retarget(fast, kvpass.Policy(default=kvpass.Full(), layers={"9-": kvpass.Window(4)}))
    with pytest.raises(kvpass.PolicyError, match="is empty"):
        kvpass.Policy(layers={"1-0": kvpass.Window(4)})
    ok = kvpass.optimize(model, kvpass.Policy(default=kvpass.Full(), layers={"1-": kvpass.Window(4)}))
    assert ok._kvpass.counters["window"] == 1


def test_policies_that_change_nothing_are_errors():
    """SharedKV to the present head count and MHC(ratio=inf) used to succeed with '1.00x smaller'."""
    import families as fam

    model = fam.build("llama")
    h = kvpass.find_sites(model)[0].num_kv_heads
    for form in (kvpass.SharedKV(kv_heads=h), kvpass.SharedKV(ratio=1)):
        with pytest.raises(kvpass.PolicyError, match=f"changes nothing on .*already has {h} KV heads"):
            kvpass.optimize(model, form)
    with pytest.raises(kvpass.PolicyError, match="finite number > 1"):
        kvpass.MHC(ratio=float("inf"))
    fast = kvpass.optimize(model, kvpass.SharedKV(kv_heads=1))  # fewer heads still work
    assert kvpass.kv_bytes_per_token(fast) < kvpass.kv_bytes_per_token(model)
    # sharing across layers at the present head count is a change
    kvpass.optimize(model, kvpass.SharedKV(kv_heads=h, cross_layer=2))

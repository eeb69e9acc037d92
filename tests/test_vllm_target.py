"""The vLLM target on kvpass's side (no vLLM needed): logit sinks (the form vLLM's attention runs),
what `--target vllm` writes and what it refuses.  tests/test_vllm.py runs the outputs on vLLM."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

import kvpass
from kvpass.assets import models
from kvpass.checkpoint import vllm as target
from kvpass.checkpoint.rewrite import parse_policy, rewrite
from kvpass.cli import main
from kvpass.semantics import reference
from kvpass.transform.passes.window import sink_logits_for

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be. ") * 40


def _tiny_llama(folder: Path, layers: int = 3, model_type: str = "llama") -> Path:
    tok = tf.AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    torch.manual_seed(0)
    cls_cfg, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[model_type]
    cfg = cls_cfg(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
    cls(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("src") / "tiny")


def _ids():
    return torch.randint(5, 400, (2, 40), generator=torch.Generator().manual_seed(3))


def test_sink_logit_fit_recovers_a_known_logit():
    """A sink token whose score is the same constant c for every query and whose value is zero
    is exactly a sink logit c: the fit finds c (per head), and is able to tell heads apart."""
    torch.manual_seed(0)
    B, H, S, D, W = 2, 3, 96, 8, 16
    q = torch.randn(B, H, S, D)
    k = torch.randn(B, H, S, D)
    v = torch.randn(B, H, S, D)
    c = torch.tensor([1.5, -0.5, 4.0])
    # key 0: q·k0·scale = c_h for every query (k0 along q's direction with the right length)
    scale = D ** -0.5
    k[:, :, 0] = 0
    q[..., 0] = 1.0
    k[:, :, 0, 0] = c[None] / scale
    q[:, :, 0, 1:] = 0  # the first query's own score with k0 is c too
    v[:, :, 0] = 0
    # queries beyond the window (nearer ones see the sink token itself, where a logit only adds)
    sigma = sink_logits_for(q[:, :, W + 1:], k, v, scale=scale, softcap=None, size=W, sinks=1, q_offset=W + 1)
    torch.testing.assert_close(sigma, c, atol=0.02, rtol=0)
    # over every row the near ones pull the logit down (they would rather have none)
    assert (sink_logits_for(q, k, v, scale=scale, softcap=None, size=W, sinks=1) < c - 1e-3).all()
    # and the logit reproduces the token sink for every query beyond the window
    pos = torch.arange(S)
    a = reference.attention(q, k, v, causal=True, window=W, sinks=1, q_pos=pos[None], k_pos=pos[None])
    b = reference.attention(q, k, v, causal=True, window=W, sinks=0, sink_logits=sigma, q_pos=pos[None],
                            k_pos=pos[None])
    far = slice(W + 1, None)
    torch.testing.assert_close(a[:, :, far], b[:, :, far], atol=1e-3, rtol=1e-3)
    none = reference.attention(q, k, v, causal=True, window=W, sinks=0, q_pos=pos[None], k_pos=pos[None])
    assert (none[:, :, far] - a[:, :, far]).abs().max() > 1e-2  # the sink mattered


def test_logit_sink_window_runs_the_reference_and_decodes_like_prefill(src):
    """Window(W, S, sink="logit"): calibrated logits per layer, a ring of W slots (no pinned
    tokens), generate() token by token equal to one prefill, and a checkpoint that reloads
    with the same logits."""
    model, tok = models.load(src)
    form = kvpass.Window(8, sinks=2, sink="logit")
    fast = kvpass.optimize(model, form, calibration=TEXT, tokenizer=tok)
    cores = [m.kv_core for m in fast.modules() if hasattr(m, "kv_core")]
    assert all(c.plan.window == 8 and c.plan.sinks == 0 for c in cores)
    logits = torch.stack([c.sink_logits.detach() for c in cores])
    assert logits.shape == (3, 4) and torch.isfinite(logits).all() and logits.std() > 0
    ids = _ids()[:1, :20]
    out = fast.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert all(layer.keys.shape[2] == 8 for layer in out.cache.layers)  # W slots, no sink tokens
    full = fast(out.sequences).logits[0, 19:-1].argmax(-1)
    assert full.tolist() == out.sequences[0, 20:].tolist()
    # not the plain window: the logits change the model
    plain = kvpass.optimize(model, kvpass.Window(8, sinks=0))
    assert (plain(_ids()).logits - fast(_ids()).logits).abs().max() > 1e-4


def _record(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())


def test_vllm_target_writes_per_layer_records_and_reloads_in_kvpass(src, tmp_path, capsys):
    """A mixed per-layer policy becomes kvpass's vLLM class with one record per layer; the same
    folder loads in kvpass with the logits of optimize() in memory (streamed and in-memory
    writers agree)."""
    pol = {"version": 1, "default": [{"kind": "window", "size": 8, "sinks": 2, "sink": "logit"}],
           "layers": {"1": [{"kind": "shared_kv", "kv_heads": 1}],
                      "2": [{"kind": "shared_kv", "kv_heads": 1}, {"kind": "window", "size": 12, "sinks": 0}]}}
    (tmp_path / "p.json").write_text(json.dumps(pol))
    out = tmp_path / "out"
    assert main(["rewrite", str(src), str(out), "--policy", str(tmp_path / "p.json"), "--target", "vllm",
                 "--calibration", TEXT, "--context", "1024"]) == 0
    line = capsys.readouterr().out
    assert "vLLM class" in line and "at 1,024 tokens" in line
    cfg = _record(out)
    assert cfg["architectures"] == ["KVPassLlamaForCausalLM"]
    assert cfg["kvpass"]["hf_architecture"] == "LlamaForCausalLM" and cfg["kvpass"]["target"] == "vllm"
    assert cfg["kvpass"]["vllm"]["layers"] == [
        {"kv_heads": 2, "keep": [0, 1], "window": 8, "sink_logits": True, "kv_cache_dtype": "auto"},
        {"kv_heads": 1, "keep": [0], "window": None, "sink_logits": False, "kv_cache_dtype": "auto"},
        {"kv_heads": 1, "keep": [0], "window": 12, "sink_logits": False, "kv_cache_dtype": "auto"}]
    again = kvpass.from_pretrained(out)
    model, tok = models.load(src)
    fast = kvpass.optimize(model, parse_policy(str(tmp_path / "p.json")), calibration=TEXT, tokenizer=tok)
    torch.testing.assert_close(again(_ids()).logits, fast(_ids()).logits, atol=1e-5, rtol=1e-5)
    mem = tmp_path / "mem"
    kvpass.save_pretrained(fast, mem, tokenizer=tok, target="vllm")
    assert _record(mem)["kvpass"]["vllm"] == cfg["kvpass"]["vllm"]
    torch.testing.assert_close(kvpass.from_pretrained(mem)(_ids()).logits, fast(_ids()).logits, atol=1e-5, rtol=1e-5)


def test_vllm_target_prefers_native_outputs(src, tmp_path, capsys):
    """Uniform SharedKV stays a stock checkpoint with fewer num_key_value_heads."""
    out = tmp_path / "gqa"
    assert main(["rewrite", str(src), str(out), "--policy", "shared_kv:kv_heads=1", "--target", "vllm"]) == 0
    cfg = _record(out)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 1
    assert cfg["kvpass"]["native"] and cfg["kvpass"]["target"] == "vllm"


@pytest.mark.parametrize("policy,words", [
    ("window:size=8,sinks=4", ["sink='logit'", "pins no sink tokens"]),
    ("sparse:block=4,local=2", ["block-sparse"]),
    ("mhc:rank=16,method=svd", ["MLA"]),
    ("quantize:bits=4,group=16", ["int4", "fp8"]),
    ('{"version": 1, "default": {"kind": "quantize", "format": "fp8"}, "layers": {"2": {"kind": "full"}}}',
     ["layers [0, 1]", "one KV dtype"]),
    ("window:size=8,sinks=2,sink=logit+quantize:format=fp8", ["sink logits with an fp8 KV cache"]),
    ("shared_kv:cross_layer=2", ["cross-layer"]),
    ('{"version": 1, "default": {"kind": "full"}, "layers": {"2": {"kind": "sparse"}}}', ["layers 2:", "Sparse"]),
])
def test_vllm_target_refuses_what_vllm_cannot_run(src, tmp_path, capsys, policy, words):
    """Forms vLLM cannot run are refused before anything is written, naming the layers, the form
    and why (exit 2, one line)."""
    out = tmp_path / "out"
    assert main(["rewrite", str(src), str(out), "--policy", policy, "--target", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "--target vllm" in err and all(w in err for w in words), err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left either


def test_fp8_everywhere_declares_vllms_kv_scheme(src, tmp_path):
    """Quantize(format="fp8") on every layer: the checkpoint declares vLLM's fp8 KV-cache scheme
    (no engine option needed) and kvpass's runtime stores one byte per value."""
    out = tmp_path / "fp8"
    rewrite(str(src), out, parse_policy("window:size=16,sinks=0+quantize:format=fp8"), target="vllm", progress=False)
    cfg = _record(out)
    assert cfg["quantization_config"]["kv_cache_scheme"]["num_bits"] == 8
    assert {r["kv_cache_dtype"] for r in cfg["kvpass"]["vllm"]["layers"]} == {"fp8"}
    again = kvpass.from_pretrained(out)
    assert kvpass.kv_bytes_per_token(again) == 3 * (2 * 2 * 16 * 1 + 8)  # K+V, 2 heads x 16, 1 byte; position
    model, _ = models.load(src)
    diff = (again(_ids()).logits - kvpass.optimize(model, kvpass.Window(16, sinks=0))(_ids()).logits).abs().max()
    assert 0 < diff < 0.5  # fp8 rounding: small, not nothing


def test_vllm_target_names_the_model_type_it_cannot_serve(tmp_path):
    """kvpass's vLLM class is Llama's: a per-layer policy on another architecture is refused by
    model type (uniform SharedKV would still be native)."""
    qwen = _tiny_llama(tmp_path / "qwen", model_type="qwen2")
    pol = kvpass.Policy(default=kvpass.Full(), layers={1: kvpass.Window(8, sinks=0)})
    with pytest.raises(kvpass.PolicyError, match="model type 'qwen2'"):
        rewrite(str(qwen), tmp_path / "out", pol, target="vllm", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(kvpass.PolicyError, match="target: invalid value 'tgi'"):
        rewrite(str(qwen), tmp_path / "out", pol, target="tgi", progress=False)


def test_serving_bytes_counts_vllm_window_reservations():
    """vLLM keeps ceil((window - 1 + max_num_batched_tokens) / block) + 1 blocks of a sliding layer
    per request (never more than the request)."""
    recs = [{"kv_heads": 2, "window": None}, {"kv_heads": 1, "window": 100}]
    assert target.serving_bytes(recs, 64, 4096, 256, elem=4) == 2 * 2 * 64 * 4 * 4096 + 2 * 1 * 64 * 4 * 512
    assert target.serving_bytes(recs, 64, 200, 256, elem=4) == 2 * 2 * 64 * 4 * 200 + 2 * 1 * 64 * 4 * 200


def test_budget_for_vllm_searches_only_what_vllm_serves(tmp_path):
    """Policy.budget(target="vllm"): every chosen layer is servable (full or logit-sink windows,
    fp8 on all layers or none), within the budget as vLLM holds a request, and the policy
    rewrites to a vLLM folder."""
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 1024))
    for kinds, ratio in ((("quantize", "window"), 6), (("window",), 2)):
        pol = kvpass.Policy.budget(model, kv_ratio=ratio, context=1024, calibration=ids, progress=False,
                                   target="vllm", max_num_batched_tokens=64, forms=kinds)
        search = pol.explanation
        assert search.bytes <= search.budget
        chosen = [pol.forms_for(i, "") for i in range(3)]
        for forms in chosen:
            target.check_forms(forms, "test")
            fp8_here = any(f.kind == "quantize" for f in forms)
            assert all(f.sink == "logit" or (fp8_here and f.sinks == 0) for f in forms if f.kind == "window")
        fp8 = {any(f.kind == "quantize" for f in forms) for forms in chosen}
        assert fp8 == ({True} if "quantize" in kinds else {False})
        assert any(f.kind == "window" for forms in chosen for f in forms)  # the budget needs windows
    fast = kvpass.optimize(model, pol, calibration=ids)
    kvpass.save_pretrained(fast, tmp_path / "out", target="vllm")
    assert _record(tmp_path / "out")["architectures"] == [target.ARCHITECTURE]
    with pytest.raises(kvpass.PolicyError, match="not searched"):
        kvpass.Policy.budget(model, kv_ratio=2, context=1024, calibration=ids, target="vllm", forms=("sparse",))

"""The generated C decode kernels (kvpass.kernels.cpu) against the reference they implement:
quantized store + full-precision residual, every bit width and axis, GQA / arbitrary head
maps, windows with sinks, soft-capping, empty and out-of-order slots, several split-K chunks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpass
from kvpass.kernels import KernelSpec, cpu
from kvpass.kernels.ops import _quant_reference, quant_attention
from kvpass.semantics.qformat import quantize

pytestmark = pytest.mark.skipif(cpu.compiler() is None, reason="no C compiler")


def _case(draw_seed, B, H, Hkv, D, S, R, bits, group, keys, values, head_map, window, sinks, softcap,
          holes, shuffle):
    g = torch.Generator().manual_seed(draw_seed)
    unit = group if "channel" in (keys, values) else 1
    spec = KernelSpec(num_heads=H, num_kv_heads=Hkv, head_dim=D, kv_head_map=head_map, causal=True,
                      window=window, sinks=sinks, softcap=softcap,
                      extra={"quant": {"bits": bits, "group": group, "keys": keys, "values": values,
                                       "unit": unit}})
    k, v = torch.randn(B, Hkv, S, D, generator=g) * 2, torch.randn(B, Hkv, S, D, generator=g)
    kq = quantize(k, bits, group if keys == "token" else unit, keys)
    vq = quantize(v, bits, group if values == "token" else unit, values)
    k_pos = torch.arange(S).expand(B, S).clone()
    if shuffle:  # a ring buffer: slots hold positions out of order (whole units stay together)
        units = torch.randperm(S // unit, generator=g)
        k_pos = (units[:, None] * unit + torch.arange(unit)).flatten().expand(B, S).clone()
    if holes:  # empty slots
        k_pos[:, torch.rand(S, generator=g) < 0.2] = -1
    rk, rv = torch.randn(B, Hkv, R, D, generator=g), torch.randn(B, Hkv, R, D, generator=g)
    rpos = (S + torch.arange(R)).expand(B, R).clone()
    if R:
        rpos[-1, -1] = -1  # an empty residual slot
    q = torch.randn(B, H, 1, D, generator=g)
    q_pos = torch.full((B, 1), S + R - 1)
    return spec, q, (*kq[:3], *vq[:3]), (rk, rv, rpos), q_pos, k_pos


@st.composite
def cases(draw):
    bits = draw(st.sampled_from([8, 4, 2]))
    keys = draw(st.sampled_from(["channel", "token"]))
    values = draw(st.sampled_from(["token", "channel"]))
    D = draw(st.sampled_from([16, 32, 48, 64]))
    group = draw(st.sampled_from([g for g in (1, 2, 4, 8, 16, 32, 64) if g <= D and D % g == 0]))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    head_map = draw(st.one_of(st.just(()), st.lists(st.integers(0, Hkv - 1), min_size=H, max_size=H)))
    unit = group if "channel" in (keys, values) else 1
    S = unit * draw(st.integers(0, 700 // unit))
    window = draw(st.sampled_from([None, 1, 5, 100, 300]))
    return dict(draw_seed=draw(st.integers(0, 10_000)), B=draw(st.integers(1, 2)), H=H, Hkv=Hkv, D=D, S=S,
                R=draw(st.integers(0, 6)), bits=bits, group=group, keys=keys, values=values,
                head_map=tuple(head_map), window=window, sinks=draw(st.integers(0, 4)) if window else 0,
                softcap=draw(st.sampled_from([None, 5.0])), holes=draw(st.booleans()),
                shuffle=draw(st.booleans()))


@settings(max_examples=25, deadline=None)  # each example compiles a kernel
@given(case=cases())
def test_cpu_kernel_equals_the_reference(case):
    spec, q, store, residual, q_pos, k_pos = _case(**case)
    ref = _quant_reference(q, *store, *residual, q_pos, k_pos, None, [], spec)
    out = cpu.quant_decode(q, *store, *residual, spec, q_pos, k_pos)
    assert out is not None and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), float((out - ref).abs().max())


def test_both_paths_of_each_fast_format():
    """The common KIVI layout (per-channel keys, per-token values) has hand-vectorised paths for
    4 and 8 bits; a long store (many chunks, full visibility) exercises them end to end."""
    for bits, group in [(4, 32), (4, 64), (8, 64), (2, 32)]:
        spec, q, store, residual, q_pos, k_pos = _case(
            1, 1, 9, 3, 64, 2048, 7, bits, group, "channel", "token", (), None, 0, None, False, False)
        ref = _quant_reference(q, *store, *residual, q_pos, k_pos, None, [], spec)
        out = cpu.quant_decode(q, *store, *residual, spec, q_pos, k_pos)
        assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4), (bits, group, float((out - ref).abs().max()))


def test_unsupported_specs_fall_back():
    spec, q, store, residual, q_pos, k_pos = _case(0, 1, 2, 1, 16, 64, 2, 4, 16, "channel", "token", (), None, 0,
                                                   None, False, False)
    assert cpu.supports(spec) is None
    half = spec.replace(dtype="float16")
    assert "fp32" in cpu.supports(half)
    assert cpu.quant_decode(q.half(), *store, *residual, half, q_pos, k_pos) is None
    with pytest.raises(kvpass.KVPassError):
        cpu.source(KernelSpec(num_heads=2, num_kv_heads=1, head_dim=16))  # not a quantized store


def test_switches_and_the_decode_path(monkeypatch):
    """Quantized decode in a model runs the C kernel by default; KVPASS_CPU_KERNELS=0 and an
    explicit KVPASS_KERNELS=reference run the reference -- with the same logits."""
    import families as fam

    torch.manual_seed(0)
    model = fam.llama(num_hidden_layers=2).eval()
    fast = kvpass.optimize(model, kvpass.Quantize(bits=4, group=8))
    calls = []
    real = cpu.quant_decode

    def counted(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu, "quant_decode", counted)
    ids = torch.randint(1, fam.VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))

    def decode():
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            fast(ids[:, :30], cache=cache, use_cache=True)
            return torch.cat([fast(ids[:, i:i + 1], cache=cache, use_cache=True).logits for i in range(30, 40)], 1)

    with_c = decode()
    assert calls and all(calls)
    calls.clear()
    monkeypatch.setenv("KVPASS_CPU_KERNELS", "0")
    without = decode()
    assert not calls
    monkeypatch.delenv("KVPASS_CPU_KERNELS")
    monkeypatch.setenv("KVPASS_KERNELS", "reference")
    assert torch.allclose(decode(), without)
    assert not calls
    assert torch.allclose(with_c, without, atol=1e-4), float((with_c - without).abs().max())


def test_the_op_and_the_direct_call_agree():
    spec, q, store, residual, q_pos, k_pos = _case(3, 2, 4, 2, 32, 512, 3, 4, 32, "channel", "token", (), 100, 2,
                                                   None, True, True)
    a = quant_attention(q, store, residual, spec, q_pos, k_pos)
    b = torch.ops.kvpass.quant_attention(q, *store, *residual, q_pos, k_pos, None, [], spec.to_json())
    assert torch.allclose(a, b)


def test_a_residual_longer_than_a_chunk_falls_back():
    """The kernel keeps one chunk's logits on its stack: a longer residual (a large
    ``Quantize(residual=...)``) goes to the reference instead of overflowing it."""
    spec, q, store, residual, q_pos, k_pos = _case(0, 1, 2, 1, 16, 64, cpu.CHUNK + 1, 4, 16, "channel", "token", (),
                                                   None, 0, None, False, False)
    assert cpu.quant_decode(q, *store, *residual, spec, q_pos, k_pos) is None
    ref = _quant_reference(q, *store, *residual, q_pos, k_pos, None, [], spec)
    assert torch.allclose(quant_attention(q, store, residual, spec, q_pos, k_pos), ref)

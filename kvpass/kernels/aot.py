"""Ahead-of-time compilation of generated kernels for a CUDA target -- no GPU needed.

Triton's front end and its bundled ``ptxas`` run on any machine, so CI can check that the
generated source compiles for Hopper (``sm_90``) where no GPU exists.  Needs a process whose
triton runs compiled kernels (``TRITON_INTERPRET`` unset when triton was imported);
``python -m kvpass.kernels.aot`` runs a small matrix of specs.

Example (needs ``TRITON_INTERPRET`` unset):
    >>> from kvpass.kernels import KernelSpec
    >>> spec = KernelSpec(num_heads=4, num_kv_heads=1, head_dim=64)
    >>> sorted(compile_for(spec, "decode"))                     # doctest: +SKIP
    ['attn_decode_reduce', 'attn_decode_split']
"""

from __future__ import annotations

import sys
import time

from .generate import interpreting, load
from .spec import CodegenError, KernelSpec

__all__ = ["compile_for"]

_PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
_ARG_TYPES = {
    **dict.fromkeys(("QPOS", "KPOS", "HMAP", "HGROUPS"), "*i32"),
    **dict.fromkeys(("MASK", "MP", "LP", "ACCP"), "*fp32"),
    "BTAB": "*i8",
    **dict.fromkeys(("BK", "BKP", "BV", "FRQ", "CA", "SB"), "*fp32"),  # latent weights (fp32)
}


def _signature(fn, spec: KernelSpec, constexprs: dict[str, object]) -> dict[str, str]:
    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in ("Q", "K", "V", "O", "UK", "UKP", "UV"):
            return _PTR[spec.dtype]
        return _ARG_TYPES.get(name, "i32")

    return {name: arg_type(name) for name in fn.arg_names}


def compile_for(spec: KernelSpec, kind: str = "prefill", *, capability: int = 90,
                pos_contig: bool = True, block_m: int = 64, block_n: int = 64,
                num_warps: int = 4, num_stages: int = 2) -> dict[str, dict[str, int]]:
    """Compile the (spec, kind) kernels to cubin for ``sm_<capability>``.

    Returns ``{kernel name: {"cubin_bytes", "shared"}}``; raises on any compile error.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise CodegenError("compile_for needs triton imported without TRITON_INTERPRET=1")
    mod = load(spec, kind)
    flags = dict(POS_CONTIG=pos_contig, UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n)
    jobs = [(mod.attn_prefill, flags)] if kind == "prefill" else [
        (mod.attn_decode_split, flags), (mod.attn_decode_reduce, dict(BLOCK_S=16))]
    out = {}
    for fn, ce in jobs:
        src = ASTSource(fn=fn, signature=_signature(fn, spec, ce), constexprs=ce)
        k = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        out[fn.__name__] = {"cubin_bytes": len(k.asm["cubin"]), "shared": k.metadata.shared}
    return out


def _main() -> None:
    specs = [
        KernelSpec(num_heads=8, num_kv_heads=2, head_dim=128, causal=True, dtype="bfloat16"),
        KernelSpec(num_heads=4, num_kv_heads=2, head_dim=80, kv_head_map=(1, 0, 1, 0),
                   causal=True, window=16, sinks=2, softcap=30.0, block=64,
                   has_block_mask=True, has_mask=True, dtype="bfloat16"),
        KernelSpec(num_heads=4, num_kv_heads=1, head_dim=256, causal=True, window=512,
                   dtype="float16"),
        KernelSpec(num_heads=9, num_kv_heads=3, head_dim=64, causal=True, dtype="bfloat16",
                   extra={"latent": {"rank": 96, "rope": True, "norm_eps": 1e-6}}),
    ]
    for spec in specs:
        for kind in ("prefill", "decode"):
            for contig in (True, False):
                t0 = time.perf_counter()
                info = compile_for(spec, kind, pos_contig=contig)
                print(f"{spec.key()[:12]} {kind:7s} contig={contig!s:5s} "
                      f"{time.perf_counter() - t0:5.1f}s {info}", file=sys.stdout)


if __name__ == "__main__":
    _main()

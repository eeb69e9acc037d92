"""The ``kvpass`` command line.

    kvpass inspect smollm2-135m           # one row per attention site, and totals
    kvpass inspect ./my-hf-folder --json  # the same, for machines
    kvpass kernels --heads 9 --kv-heads 3 --head-dim 64 --causal --kind decode --dump

Exit codes: 0 success, 2 bad input (one clear line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import KVPassError

EPILOG = """\
MODEL is a bundled name (smollm2-135m, gemma3-270m, minilm-l6), a Hugging Face model
folder (config.json + safetensors), or a .gguf file (converted once into a cached HF folder
under $KVPASS_CACHE, default ~/.cache/kvpass).  Nothing is downloaded.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvpass", description="Find a transformer's attention sites and shrink its KV cache.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ins = sub.add_parser(
        "inspect", help="list the attention sites found in a model's traced graph",
        description="Trace MODEL with torch.export, find every attention core in the graph and "
                    "print one row per site: heads, KV heads, head_dim, positional scheme, window, "
                    "KV-cache bytes per token (at the model's dtype), and totals.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("model", metavar="MODEL")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=cmd_inspect)
    ker = sub.add_parser(
        "kernels", help="print the Triton source kvpass generates for an attention form",
        description="Generate (or read from the on-disk cache) the Triton kernel specialised to one "
                    "attention form and print it. Example: kvpass kernels --heads 9 --kv-heads 3 "
                    "--head-dim 64 --causal --window 512 --sinks 4 --kind decode --dump")
    ker.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    ker.add_argument("--kv-heads", type=int, default=2, help="stored KV heads (default 2)")
    ker.add_argument("--head-dim", type=int, default=64, help="16..256 (default 64)")
    ker.add_argument("--causal", action="store_true", help="causal attention")
    ker.add_argument("--window", type=int, default=None, help="sliding window (tokens)")
    ker.add_argument("--sinks", type=int, default=0, help="attention sinks with --window")
    ker.add_argument("--softcap", type=float, default=None, help="tanh soft-capping of scores")
    ker.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ker.add_argument("--kind", default="prefill", choices=["prefill", "decode"])
    ker.add_argument("--spec", default=None, help="a KernelSpec as JSON (overrides the flags above)")
    ker.add_argument("--dump", action="store_true", help="print the source (default: its cache path)")
    ker.set_defaults(func=cmd_kernels)
    return p


def cmd_kernels(args) -> int:
    from . import codegen

    if args.spec:
        spec = codegen.KernelSpec.from_json(args.spec)
    else:
        spec = codegen.KernelSpec(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                  causal=args.causal, window=args.window, sinks=args.sinks,
                                  softcap=args.softcap, dtype=args.dtype)
    text = codegen.source(spec, args.kind)
    if args.dump:
        print(text)
    else:
        print(codegen.kernel_path(spec, args.kind))
    return 0


def cmd_inspect(args) -> int:
    import torch

    from . import models
    from .sites import find_sites

    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr)
    model, _tok = models.load(args.model)
    print(f"tracing ({time.time() - t0:.1f}s) ...", file=sys.stderr)
    sites = find_sites(model)
    size = next(model.parameters()).element_size()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    rows = []
    for s in sites:
        d = s.describe()
        d["kv_bytes_per_token"] = s.kv_values_per_token() * size
        rows.append(d)
    total = sum(r["kv_bytes_per_token"] for r in rows)
    if args.json:
        print(json.dumps({"model": args.model, "dtype": dtype, "sites": rows,
                          "total_kv_bytes_per_token": total}, indent=2))
        return 0
    head = f"{'layer':>5}  {'module':<34} {'heads':>5} {'kv':>3} {'dim':>4}  {'positional':<26} " \
           f"{'window':>6} {'causal':>6} {'KV B/tok':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:>5}  {r['name'][-34:]:<34} {r['num_heads']:>5} {r['num_kv_heads']:>3} "
              f"{r['head_dim']:>4}  {r['positional']:<26} {r['window'] or '-':>6} "
              f"{'yes' if r['causal'] else 'no':>6} {r['kv_bytes_per_token']:>9,}")
        for prob in r["problems"]:
            print(f"       ! {prob}")
    print("-" * len(head))
    print(f"{len(rows)} attention sites; KV cache {total:,} bytes/token ({dtype}); "
          f"{total * 4096 / 2**20:,.1f} MiB at 4096 tokens per sequence")
    del torch
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except KVPassError as e:
        print(f"kvpass: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `kvpass kernels --dump | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

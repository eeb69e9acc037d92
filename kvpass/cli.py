"""The ``kvpass`` command line.

    kvpass inspect smollm2-135m           # one row per attention site, and totals
    kvpass inspect ./my-hf-folder --json  # the same, for machines
    kvpass kernels --heads 9 --kv-heads 3 --head-dim 64 --causal --kind decode --dump
    kvpass kernels --causal --quant-bits 4 --kind decode --dump     # int4 cache, dequantized in registers
    kvpass rewrite smollm2-135m out/ --policy shared_kv:kv_heads=1   # native GQA checkpoint
    kvpass rewrite ./hf-folder out/ --policy policy.yaml --calibration notes.txt --heal 50
    kvpass rewrite smollm2-135m out/ --target vllm --calibration persuasion \
        --policy 'window:size=512,sinks=4,sink=logit'       # served by `vllm serve out/`
    kvpass eval smollm2-135m --policy window:size=512,sinks=4 --policy quantize:bits=4 --plot eval.png
    kvpass zoo --only llama gpt2 bert     # every transformers architecture, built tiny (all: no --only)

Exit codes: 0 success; 2 bad input — a kvpass error, or a file that is missing, unreadable,
corrupt or cannot be written (permissions, disk full): one line on stderr naming the file and
what is wrong, no traceback; 1 a bug in kvpass (its traceback, and a request to report it);
130 interrupted (Ctrl-C), 143 terminated (SIGTERM).  Interrupted rewrites leave no OUT behind.
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


def _form_keys() -> str:
    """The form kinds and their keys (from the form classes themselves), for --help."""
    import dataclasses

    from .ir.forms import FORMS

    rows = [f"  {kind:<10} " + (", ".join(f.name for f in dataclasses.fields(cls)) or "(no keys)")
            for kind, cls in FORMS.items()]
    return "Forms and their keys (meanings and defaults: help(kvpass.Window) etc., or the README):\n" + "\n".join(rows)


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
    ker.add_argument("--quant-bits", type=int, default=None, choices=[8, 4, 2],
                     help="quantized KV storage: bits per value (decode kernels dequantize in registers)")
    ker.add_argument("--quant-group", type=int, default=64, help="values (or tokens) per scale (default 64)")
    ker.add_argument("--quant-keys", default="channel", choices=["channel", "token"],
                     help="key scales per channel over GROUP tokens, or per GROUP values of a token")
    ker.add_argument("--kind", default="prefill", choices=["prefill", "decode"])
    ker.add_argument("--spec", default=None, help="a KernelSpec as JSON (overrides the flags above)")
    ker.add_argument("--dump", action="store_true", help="print the source (default: its cache path)")
    ker.set_defaults(func=cmd_kernels)
    rw = sub.add_parser(
        "rewrite", help="rewrite a saved checkpoint into a KV-saving one",
        description="Read SRC, apply POLICY (calibrating on --calibration text where the policy "
                    "needs it), and write OUT: a native transformers checkpoint where one exists "
                    "(uniform SharedKV with contiguous groups -> fewer num_key_value_heads), else a "
                    "kvpass checkpoint for kvpass.from_pretrained(OUT). Policies whose forms act per "
                    "layer (all but cross-layer sharing, MHC allocate and --heal) are applied layer by "
                    "layer from the shards, calibration activations carried from layer to layer: memory "
                    "is about one decoder layer, not the model. SRC is never modified; OUT is "
                    "written to a temporary folder and renamed at the end; an existing OUT is refused "
                    "unless --force. Exit code 2 with one line on bad input.",
        epilog=EPILOG + "\nPOLICY: a .json/.yaml policy file, inline JSON, or forms like "
               "'mhc:ratio=4,method=whitened' joined by '+' (e.g. 'shared_kv:kv_heads=1+window:size=512,sinks=4').\n"
               + _form_keys() + "\nOUT is locked while it is written (.OUT.kvpass-lock beside it): a second "
               "rewrite to the same OUT exits 2 naming the first; temporaries of killed runs are removed by "
               "the next run.\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rw.add_argument("src", metavar="SRC", help="bundled name, HF folder (safetensors) or .gguf")
    rw.add_argument("out", metavar="OUT", help="output folder (must not exist unless --force)")
    rw.add_argument("--policy", required=True, help="policy file, JSON, or kind:key=value forms")
    rw.add_argument("--calibration", default=None,
                    help="calibration text, a text file, or a bundled text name (persuasion, calibration, ...; "
                         "needed by whitened/aware MHC, logit sinks, "
                         "similarity grouping, calibrated merge, --heal)")
    rw.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the written weights (computation is fp32)")
    rw.add_argument("--heal", type=int, default=0, help="local distillation steps per layer (default 0)")
    rw.add_argument("--force", action="store_true", help="replace an existing OUT")
    rw.add_argument("--allow-pickle", action="store_true",
                    help="accept pickle .bin sources (loaded with weights_only=True)")
    rw.add_argument("--no-native", action="store_true", help="always write a kvpass checkpoint")
    rw.add_argument("--target", default="kvpass", choices=["kvpass", "vllm"],
                    help="kvpass: a checkpoint for kvpass.from_pretrained (native where one exists). vllm: a "
                         "folder stock vLLM serves (`vllm serve OUT`, with kvpass installed beside vLLM: its "
                         "plugin registers kvpass's vLLM class) with the saving in vLLM's own KV cache: per "
                         "layer KV heads, sliding windows, sink logits (window:...,sink=logit); forms vLLM cannot "
                         "run (token sinks, sparse, MHC, int quantization, cross-layer) are refused before "
                         "writing, naming the layer")
    rw.add_argument("--context", type=int, default=4096,
                    help="the summary reports the KV cache at this many tokens (default 4096)")
    rw.add_argument("--in-memory", action="store_true",
                    help="load the whole model even when the policy could stream layer by layer")
    rw.add_argument("--max-shard-size", default="5GB",
                    help="largest weight file of a streamed rewrite, e.g. 5GB, 500MB (default 5GB)")
    rw.add_argument("--allow-nonfinite", action="store_true",
                    help="write even if a source tensor holds NaN/Inf (default: refused, naming the tensor)")
    rw.set_defaults(func=cmd_rewrite)
    ev = sub.add_parser(
        "eval", help="measure quality, KV bytes, cache memory and decode speed of policies",
        description="Evaluate MODEL as it is and rewritten by each --policy, on the same tokens of "
                    "held-out text: perplexity (chunks of --context tokens), late-position perplexity "
                    "and passkey retrieval for causal LMs (embedding cosine for encoders); KV bytes "
                    "per token computed and measured from the cache; peak cache memory and decode "
                    "tokens/s at each --speed-contexts. Prints one table; --json and --plot save it "
                    "(the plot: perplexity vs KV bytes/token, Pareto front marked).",
        epilog=EPILOG + "\nPOLICY: as for `kvpass rewrite` (repeat --policy to compare several).\n"
               "Example: kvpass eval smollm2-135m --policy window:size=512,sinks=4 "
               "--policy quantize:bits=4 --context 2048 --plot eval.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument("--policy", action="append", default=[], help="policy to compare (repeatable)")
    ev.add_argument("--text", default=None, help="held-out text file (default: the bundled Emma)")
    ev.add_argument("--calibration", default=None, help="calibration text/file for calibrating policies "
                                                        "(default: the bundled Persuasion)")
    ev.add_argument("--context", type=int, default=2048, help="chunk length and reporting context (2048)")
    ev.add_argument("--chunks", type=int, default=4, help="perplexity chunks (default 4)")
    ev.add_argument("--passkey-lengths", type=int, nargs="*", default=None,
                    help="passkey prompt lengths (default: context/2 and context; none to skip)")
    ev.add_argument("--speed-contexts", type=int, nargs="*", default=[512, 2048, 8192],
                    help="contexts for decode tokens/s and peak cache memory (default 512 2048 8192)")
    ev.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per context (16)")
    ev.add_argument("--budget", type=float, default=None, metavar="X",
                    help="also search a per-layer policy whose cache is 1/X of the original (Policy.budget)")
    ev.add_argument("--budget-context", type=int, default=None, help="context of the budget (default --context)")
    ev.add_argument("--budget-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="cache dtype the budget is counted in (default: the model's)")
    ev.add_argument("--bytes-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="cache dtype the table and the plot count bytes in (default: --budget-dtype, "
                         "else the model's): one dtype for every row")
    ev.add_argument("--forms", nargs="*", default=["quantize", "window"], help="forms the budget search mixes")
    ev.add_argument("--json", default=None, help="write the rows as JSON")
    ev.add_argument("--plot", default=None, help="write the quality-vs-bytes plot (PNG)")
    ev.set_defaults(func=cmd_eval)
    demo = sub.add_parser(
        "demo", help="the main job: SmolLM2-135M, a default policy and a 4x budget search, side by side",
        description="Load the bundled SmolLM2-135M, evaluate it as it is, with the default policy "
                    "(int4 KV storage, keys per channel) and with a per-layer policy searched for 1/4 "
                    "of the cache (bf16 bytes at --context tokens), on held-out text (Emma; the search "
                    "calibrates on Persuasion). Prints the comparison table, the budget's per-layer "
                    "choices and the plot path. About 10 minutes on 2 CPU cores.")
    demo.add_argument("--out", default="kvpass-demo", help="folder for demo.json and demo.png (default ./kvpass-demo)")
    demo.add_argument("--budget", type=float, default=4.0, help="cache reduction to search for (default 4)")
    demo.add_argument("--context", type=int, default=1024, help="tokens (default 1024)")
    demo.set_defaults(func=cmd_demo)
    zoo = sub.add_parser(
        "zoo", help="run kvpass over every transformers text architecture, built tiny",
        description="Build each causal-LM and text-encoder model type transformers registers from its "
                    "default config shrunk by meaning (hidden 64, 2 layers, 4 heads, vocab 256, small MoE; "
                    "random weights), count the attention cores a forward runs (independently of kvpass), "
                    "and check that kvpass finds them all, that optimize(Full()) equals the original "
                    "(<= 1e-4 on real tokens), and that Window (Sparse for encoders), Quantize and SharedKV "
                    "are applied or refused with a clear error. Prints one row per family: EXACT, PARTIAL "
                    "(with the first problem), NOT_FOUND, CRASH (a bug: an exception from kvpass's internals "
                    "or a form that silently did nothing), UNBUILDABLE, NO_ATTENTION, SKIPPED (multimodal). "
                    "About 10 minutes for all families on 2 cores.",
        epilog="Examples:\n  kvpass zoo --only llama gpt2 bert\n  kvpass zoo --json bench/results/zoo.json\n"
               "  python bench/zoo.py   # the whole zoo, its JSON and the README table\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    zoo.add_argument("--only", nargs="*", default=None, metavar="TYPE", help="model types to check (default all)")
    zoo.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    zoo.add_argument("--timeout", type=int, default=240, help="seconds per family before it counts as a crash")
    zoo.add_argument("--json", default=None, help="write the rows and the summary as JSON")
    zoo.set_defaults(func=cmd_zoo)
    return p


def cmd_zoo(args) -> int:
    from .eval import zoo

    fams = zoo.families()
    if args.only:
        known = dict(fams)
        bad = [t for t in args.only if t not in known]
        if bad:
            raise KVPassError(f"zoo: unknown model type(s) {bad}; e.g. {sorted(known)[:8]} "
                              f"({len(known)} in all)")
        fams = [(t, known[t]) for t in args.only]
    rows = zoo.run(fams, jobs=args.jobs, timeout=args.timeout, progress=True)
    print(zoo.markdown_table(rows))
    if args.json:
        zoo.write_json(rows, args.json)
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    import torch

    from .assets import models
    from .eval.compare import evaluate
    from .ir.forms import Quantize
    from .ir.policy import Policy

    t0 = time.time()
    print("loading smollm2-135m ...", file=sys.stderr)
    model, tok = models.load("smollm2-135m")
    print(f"searching a per-layer policy for 1/{args.budget:g} of the cache at {args.context} tokens ...",
          file=sys.stderr)
    budget = Policy.budget(model, args.budget, context=args.context, tokenizer=tok, dtype=torch.bfloat16)
    policies = {"default: int4 g64, keys per channel": Quantize(bits=4, group=64),
                f"budget {args.budget:g}x (searched)": budget}
    ev = evaluate(model, policies, tok, context=args.context, chunks=2, passkey_lengths=[args.context],
                  speed_contexts=[512, args.context], decode_steps=8, bytes_dtype="bfloat16")
    ev.settings.update(model="smollm2-135m", budget_dtype="bfloat16")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev.to_json(out / "demo.json")
    print(ev.table())
    print()
    print(f"budget {args.budget:g}x per layer (bytes in bf16):")
    print(budget.explanation.table())
    print(f"\njson: {out / 'demo.json'}\nplot: {ev.plot(out / 'demo.png')}\n"
          f"({time.time() - t0:.0f} s)")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .assets import models
    from .assets.text import load_text
    from .checkpoint.rewrite import parse_policy
    from .eval.compare import evaluate
    from .ir.policy import Policy

    policies = {p: parse_policy(p) for p in args.policy}
    text = load_text(args.text) if args.text else None
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = models.load(args.model)
    search = None
    if args.budget:
        ctx = args.budget_context or args.context
        dtype = getattr(torch, args.budget_dtype) if args.budget_dtype else None
        search = Policy.budget(model, args.budget, context=ctx, forms=tuple(args.forms), tokenizer=tok,
                               calibration=load_text(args.calibration) if args.calibration else None, dtype=dtype)
        policies[f"budget {args.budget:g}x"] = search
    calib = None
    if any(not _visibility(p) for p in policies.values()):
        calib = load_text(args.calibration or "calibration")
    ev = evaluate(model, policies, tok, text=text, context=args.context, chunks=args.chunks,
                  passkey_lengths=args.passkey_lengths, speed_contexts=args.speed_contexts,
                  decode_steps=args.decode_steps, calibration=calib,
                  bytes_dtype=args.bytes_dtype or args.budget_dtype)
    ev.settings["model"] = args.model
    print(ev.table())
    if search is not None:
        print(f"\nbudget {args.budget:g}x, per layer:")
        print(search.explanation.table())
    if args.json:
        ev.to_json(args.json)
        print(f"json: {args.json}")
    if args.plot:
        print(f"plot: {ev.plot(args.plot)}")
    return 0


def _visibility(policy) -> bool:
    from .eval.compare import policy_visibility_only

    return policy_visibility_only(policy)


def cmd_rewrite(args) -> int:
    from .checkpoint.rewrite import main_summary, parse_policy, rewrite

    policy = parse_policy(args.policy)
    warning = catastrophic_default(policy, args.heal)
    if warning:
        print(f"kvpass: warning: {warning}", file=sys.stderr)
    summary = rewrite(args.src, args.out, policy, calibration=args.calibration, dtype=args.dtype,
                      force=args.force, allow_pickle=args.allow_pickle, heal=args.heal,
                      native=not args.no_native, stream=not args.in_memory,
                      allow_nonfinite=args.allow_nonfinite, max_shard_size=args.max_shard_size,
                      target=args.target, context=args.context)
    print(main_summary(summary))
    return 0


def catastrophic_default(policy, heal: int) -> str | None:
    """A warning for a policy whose lossy default is known to wreck a trained model, else None.

    >>> from kvpass.checkpoint.rewrite import parse_policy
    >>> catastrophic_default(parse_policy("shared_kv:kv_heads=1"), heal=0)[:40]
    'SharedKV(merge=mean) without --heal is k'
    >>> catastrophic_default(parse_policy("shared_kv:kv_heads=1,merge=calibrated"), heal=150) is None
    True
    """
    forms = list(policy.default) + [f for fs in policy.layers.values() for f in fs]
    if heal == 0 and any(f.kind == "shared_kv" and f.merge == "mean" for f in forms):
        return ("SharedKV(merge=mean) without --heal is known to be catastrophic on trained models "
                "(SmolLM2-135M, 3 -> 1 KV heads: perplexity 37.1 -> 12,959; calibrated + 150 heal steps: "
                "71.9, bench/shared_kv.py): add merge=calibrated --calibration TEXT --heal 150")
    return None


def cmd_kernels(args) -> int:
    from . import kernels as codegen

    if args.spec:
        spec = codegen.KernelSpec.from_json(args.spec)
    else:
        extra = {}
        if args.quant_bits:
            unit = args.quant_group if args.quant_keys == "channel" else 1
            extra["quant"] = {"bits": args.quant_bits, "group": args.quant_group, "keys": args.quant_keys,
                              "values": "token", "unit": unit}
        spec = codegen.KernelSpec(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                                  causal=args.causal, window=args.window, sinks=args.sinks,
                                  softcap=args.softcap, dtype=args.dtype, extra=extra)
    text = codegen.source(spec, args.kind)
    if args.dump:
        print(text)
    else:
        print(codegen.kernel_path(spec, args.kind))
    return 0


def cmd_inspect(args) -> int:
    import torch

    from .assets import models
    from .checkpoint.rewrite import check_safetensors
    from .graph.sites import find_sites

    t0 = time.time()
    print(f"loading {args.model} ...", file=sys.stderr)
    for f in sorted(models.resolve(args.model).glob("*.safetensors")):
        check_safetensors(f)  # a truncated or corrupt file: one line naming it
    model, _tok = models.load(args.model)
    t1 = time.time()
    print(f"loaded in {t1 - t0:.1f} s; tracing ...", file=sys.stderr)
    sites = find_sites(model)
    print(f"traced and analysed in {time.time() - t1:.1f} s", file=sys.stderr)
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


def _io_message(e: BaseException) -> str | None:
    """One line for a foreseeable I/O or format error (naming its file), else None (a bug)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ()  # noqa: N806
    if isinstance(e, OSError):
        name = e.filename if e.filename is not None else ""
        what = e.strerror or str(e) or type(e).__name__
        return f"{name}: {what}" if name else what
    if isinstance(e, SafetensorError):
        return f"a safetensors file is corrupt: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"a file is not what it should be: {type(e).__name__}: {e}"
    return None


def _terminated(signum, frame):
    raise SystemExit(143)  # unwinds like Ctrl-C: temporary folders are removed


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except KVPassError as e:
        print(f"kvpass: error: {str(e).strip()}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `kvpass kernels --dump | head`
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 - foreseeable I/O errors in one line; a bug with its traceback
        msg = _io_message(e)
        if msg is not None:
            print(f"kvpass: error: {msg}".replace("\n", " "), file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print("kvpass: internal error (a bug in kvpass, not in your input): please report it with the "
              "traceback above and the command you ran", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Original vs kvpass-rewritten, both served by vLLM, in one run.

For a source model (default SmolLM2-135M) and a policy (``--policy``, or ``--budget R``: the
per-layer search restricted to what vLLM serves, ``kvpass.Policy.budget(..., target="vllm")``),
``kvpass rewrite --target vllm`` writes the folder; then vLLM (CPU, ``.venv-vllm``, run by
``python -m kvpass_vllm.run``) serves the original and the rewrite and reports:

- **KV capacity** (tokens; vLLM's own figure) and **max concurrency** at ``max_model_len`` 2k
  and 8k (``max_num_batched_tokens`` ``--step``): vLLM's windows only save at long contexts;
- **throughput**: output tokens/s of ``--requests`` concurrent requests (``--prompt`` tokens in,
  ``--output`` out, greedy) at 2k;
- **held-out perplexity** of the same folders on *Emma* (``--ppl-chunks`` × ``--ppl-len``
  tokens), computed by vLLM from its prompt log-probabilities, and by kvpass's own runtime on
  the same folder (they agree: the same model).

Both sides serve in ``--dtype`` (default bfloat16, what a deployment serves; an fp8 cache is
then half the bytes of the original's).  Ratios are rewritten / original.

    python bench/vllm_serving.py --budget 4 --json bench/results/vllm_serving_smollm2.json
    python bench/vllm_serving.py --policy 'window:size=512,sinks=4,sink=logit' --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text, token_chunks
from kvpass.checkpoint.rewrite import parse_policy, rewrite
from kvpass.eval.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def run_vllm(jobs: list[dict], work: Path, space_gib: int) -> list[dict]:
    if not VLLM_PY.exists():
        sys.exit(f"{VLLM_PY} missing: run `bash scripts/setup-vllm.sh` first")
    jf, out = work / "jobs.json", work / "results.json"
    jf.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON", "PYTHON"))}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(space_gib), TOKENIZERS_PARALLELISM="false")
    log = work / "vllm.log"
    with open(log, "w") as fh:
        rc = subprocess.run([str(VLLM_PY), "-m", "kvpass_vllm.run", "--jobs", str(jf), "--out", str(out)],
                            cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"vLLM failed (exit {rc}); its log: {log}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--policy", help="policy for kvpass rewrite (file, JSON or kind:key=value forms)")
    what.add_argument("--budget", type=float, help="search a vLLM-servable policy for 1/BUDGET of the cache")
    ap.add_argument("--budget-context", type=int, default=8192, help="context the budget is met at")
    ap.add_argument("--calibration", default="calibration", help="bundled text name or file (held out: Emma is eval)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--step", type=int, default=512, help="vLLM max_num_batched_tokens")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="max_model_len values")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--ppl-len", type=int, default=2048)
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("--space-gib", type=int, default=4, help="vLLM's KV cache space (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the rewrite and vLLM's files (default: temp)")
    ap.add_argument("--label", default=None, help="the policy's name in the table (default: --policy as given)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--readme", nargs="*", type=Path, default=None,
                    help="only rewrite README.md's table (between <!-- vllm:start/end -->) from these JSON files")
    args = ap.parse_args()
    if args.readme is not None:
        return update_readme(args.readme)
    if not (args.policy or args.budget):
        ap.error("give --policy or --budget (or --readme JSON...)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="kvpass-vllm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = models.resolve(args.model)
    model, tok = models.load(src)
    calib = load_text(args.calibration)
    if args.budget:
        policy = kvpass.Policy.budget(model, kv_ratio=args.budget, context=args.budget_context, tokenizer=tok,
                                      calibration=calib, target="vllm", max_num_batched_tokens=args.step,
                                      dtype=getattr(torch, args.dtype))
        print(policy.explanation.table(), flush=True)
        label = f"budget {args.budget:g}x (vLLM options) @ {args.budget_context}"
    else:
        policy = parse_policy(args.policy)
        label = args.label or args.policy
    out = work / "rewritten"
    summary = rewrite(str(src), out, policy, calibration=calib, force=True, target="vllm", context=args.budget_context,
                      progress=True)
    print(f"rewrite: {summary['format']} in {summary['seconds']:.0f}s", flush=True)
    chunks = token_chunks(tok, load_text("eval"), args.ppl_len, args.ppl_chunks)
    prompts = [c[: args.prompt].tolist() for c in chunks]
    jobs = []
    for name, folder in (("original", src), ("rewritten", out)):
        for n, length in enumerate(args.lengths):
            job = {"folder": str(folder), "dtype": args.dtype, "max_model_len": length,
                   "max_num_batched_tokens": args.step, "tag": [name, length]}
            if n == 0:
                job.update(prompts=prompts,
                           throughput={"requests": args.requests, "prompt": args.prompt, "output": args.output})
            if n == len(args.lengths) - 1:  # prompts of ppl_len tokens need a longer max_model_len
                job.update(ppl=chunks.tolist())
            jobs.append(job)
    results = run_vllm(jobs, work, args.space_gib)
    rows = {}
    for job, res in zip(jobs, results):
        rows.setdefault(job["tag"][0], {})[job["tag"][1]] = res
    kv_ppl = {}
    for name, folder in (("original", src), ("rewritten", out)):
        m = models.load(folder)[0] if name == "original" else kvpass.from_pretrained(folder)
        kv_ppl[name] = perplexity(m, chunks, batch_size=1, progress=False)
    first = args.lengths[0]
    report = {"command": "python bench/vllm_serving.py " + shlex.join(sys.argv[1:]), "model": args.model,
              "policy": label, "policy_dict": policy.to_dict(), "dtype": args.dtype,
              "step": args.step, "format": summary["format"], "seconds": time.perf_counter() - t0,
              "ppl_setting": f"{args.ppl_chunks} x {args.ppl_len} tokens of Emma (held out)",
              "throughput_setting": f"{args.requests} requests x {args.prompt} in / {args.output} out, "
                                    f"max_model_len {first}",
              "sides": {}}
    for name in ("original", "rewritten"):
        r = rows[name]
        last = args.lengths[-1]
        nll = r[last]["nll"] / r[last]["nll_tokens"]
        report["sides"][name] = {
            "capacity_tokens": {str(L): r[L]["kv_cache_tokens"] for L in args.lengths},
            "max_concurrency": {str(L): r[L]["max_concurrency"] for L in args.lengths},
            "throughput_tok_s": r[first]["throughput"]["output_tokens_per_s"],
            "ppl_vllm": math.exp(nll), "ppl_kvpass": kv_ppl[name]}
    o, w = report["sides"]["original"], report["sides"]["rewritten"]
    caps = {L: w["capacity_tokens"][L] / o["capacity_tokens"][L] for L in o["capacity_tokens"]}
    report["ratios"] = {"capacity": caps, "throughput": w["throughput_tok_s"] / o["throughput_tok_s"],
                        "ppl_vllm": w["ppl_vllm"] / o["ppl_vllm"] - 1,
                        "ppl_kvpass": w["ppl_kvpass"] / o["ppl_kvpass"] - 1}
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


def update_readme(files: list[Path]) -> None:
    """README.md's vLLM tables, one per JSON a run wrote, with the command that made it."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index("<!-- vllm:start -->"), text.index("<!-- vllm:end -->")
    parts = []
    for f in files:
        report = json.loads(Path(f).read_text())
        parts.append(table(report) + f"\n\n(`{report.get('command', 'python bench/vllm_serving.py')}`, "
                     f"JSON `{Path(f).as_posix()}`, {report['seconds'] / 60:.0f} min)\n")
    readme.write_text(text[:a] + "<!-- vllm:start -->\n" + "\n".join(parts) + text[b:])


def table(report: dict) -> str:
    """The README table of one run."""
    o, w, r = report["sides"]["original"], report["sides"]["rewritten"], report["ratios"]
    lens = list(o["capacity_tokens"])
    head = ("| side | " + " | ".join(f"KV capacity @{int(L) // 1024}k (tokens)" for L in lens)
            + " | " + " | ".join(f"max concurrency @{int(L) // 1024}k" for L in lens)
            + " | throughput (out tok/s) | perplexity (vLLM) | perplexity (kvpass runtime) |")
    sep = "|" + "---|" * (3 + 2 * len(lens) + 1)

    def row(name, s):
        return (f"| {name} | " + " | ".join(f"{s['capacity_tokens'][L]:,}" for L in lens) + " | "
                + " | ".join(f"{s['max_concurrency'][L]:.1f}" for L in lens)
                + f" | {s['throughput_tok_s']:.1f} | {s['ppl_vllm']:.3f} | {s['ppl_kvpass']:.3f} |")

    ratio = ("| rewritten / original | " + " | ".join(f"**{r['capacity'][L]:.2f}x**" for L in lens) + " | "
             + " | ".join(f"{r['capacity'][L]:.2f}x" for L in lens)
             + f" | {r['throughput']:.2f}x | {r['ppl_vllm'] * 100:+.2f}% | {r['ppl_kvpass'] * 100:+.2f}% |")
    return "\n".join([f"{report['model']}, {report['policy']} (served {report['dtype']}, "
                      f"max_num_batched_tokens {report['step']}; {report['ppl_setting']}; "
                      f"{report['throughput_setting']})", "", head, sep, row("original", o),
                      row("rewritten", w), ratio])


if __name__ == "__main__":
    main()

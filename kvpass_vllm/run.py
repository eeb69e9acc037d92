"""Run folders on vLLM (offline ``vllm.LLM``) and report what kvpass's tests and benches compare.

    python -m kvpass_vllm.run --jobs jobs.json --out results.json

``jobs.json``: a list of jobs, run one after the other in this process, each (all but
``folder`` optional)::

    {"folder": "out/", "prompts": [[ids...], ...], "max_tokens": 32, "teacher": [[ids...], ...],
     "ppl": [[ids...], ...], "max_model_len": 2048, "dtype": "float32", "kv_cache_dtype": "auto",
     "max_num_batched_tokens": null, "throughput": {"requests": 16, "prompt": 512, "output": 64}}

``results.json``: one result per job: ``{"kv_cache_tokens": int, "max_concurrency": float,
"greedy": [[ids...]], "teacher_top1": [[ids...]] (the argmax after each position of each
teacher sequence), "nll": total negative log-likelihood of the ``ppl`` sequences' tokens after
the first, "nll_tokens": their count, "throughput": {"output_tokens_per_s": ...},
"seconds": {...}}``.  ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the cache (default here 1).

Runs in vLLM's own environment (kvpass's tests keep it in ``.venv-vllm``); it imports only vLLM.
``kv_cache_tokens`` is vLLM's own figure (``cache_config.kv_cache_size_tokens``, what it logs as
"KV cache size: N tokens"): the cache it allocated, group-aware (sliding-window layers count
only their window per request), at the job's ``max_model_len``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time


class _Capacity(logging.Handler):
    """Catches vLLM's "KV cache size: N tokens, Maximum concurrency ... X" log line."""

    def __init__(self):
        super().__init__()
        self.tokens = self.concurrency = None

    def emit(self, record):
        m = re.search(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for \d+ tokens per request: ([\d.]+)x",
                      record.getMessage())
        if m:
            self.tokens, self.concurrency = int(m.group(1).replace(",", "")), float(m.group(2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", required=True, help="JSON file: a list of jobs")
    ap.add_argument("--out", required=True, help="JSON file written with one result per job")
    args = ap.parse_args(argv)
    jobs = json.loads(open(args.jobs).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the log line reaches us
    results = []
    for job in jobs:
        results.append(run(job))
        with open(args.out, "w") as fh:  # what finished is kept if a later job fails
            json.dump(results, fh)
    return 0


def run(job: dict) -> dict:
    """One job on a fresh ``vllm.LLM`` (see module docstring)."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cap = _Capacity()
    logging.getLogger("vllm").addHandler(cap)
    t0 = time.perf_counter()
    kw = {}
    if job.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = job["max_num_batched_tokens"]
    llm = LLM(model=job["folder"], dtype=job.get("dtype", "float32"), max_model_len=job.get("max_model_len", 2048),
              enforce_eager=True, kv_cache_dtype=job.get("kv_cache_dtype", "auto"), seed=0, **kw)
    cache = llm.llm_engine.vllm_config.cache_config
    tokens = getattr(cache, "kv_cache_size_tokens", None) or cap.tokens
    out = {"kv_cache_tokens": tokens, "max_concurrency": getattr(cache, "kv_cache_max_concurrency", None)
           or cap.concurrency, "max_model_len": job.get("max_model_len", 2048),
           "seconds": {"load": time.perf_counter() - t0}}
    greedy = SamplingParams(max_tokens=job.get("max_tokens", 32), temperature=0.0, ignore_eos=True)
    if job.get("prompts"):
        t = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], greedy, use_tqdm=False)
        out["greedy"] = [list(r.outputs[0].token_ids) for r in res]
        out["seconds"]["greedy"] = time.perf_counter() - t
    if job.get("teacher"):
        t = time.perf_counter()
        one = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        res = llm.generate([{"prompt_token_ids": p} for p in job["teacher"]], one, use_tqdm=False)
        top1 = []
        for r in res:  # prompt_logprobs[i]: the distribution at position i given tokens < i (None at 0)
            row = []
            for lp in r.prompt_logprobs[1:]:
                row.append(max(lp.items(), key=lambda kv: kv[1].logprob)[0])
            row.append(r.outputs[0].token_ids[0])  # the prediction after the last position
            top1.append(row)
        out["teacher_top1"] = top1
        out["seconds"]["teacher"] = time.perf_counter() - t
    if job.get("ppl"):
        t = time.perf_counter()
        one = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        res = llm.generate([{"prompt_token_ids": p} for p in job["ppl"]], one, use_tqdm=False)
        nll, count = 0.0, 0
        for p, r in zip(job["ppl"], res):
            for tok, lp in zip(p[1:], r.prompt_logprobs[1:]):
                nll -= lp[tok].logprob
                count += 1
        out["nll"], out["nll_tokens"] = nll, count
        out["seconds"]["ppl"] = time.perf_counter() - t
    if job.get("throughput"):
        tp = job["throughput"]
        base = job.get("prompts") or [[1]]
        prompts = [((base[i % len(base)] * tp["prompt"])[: tp["prompt"]]) for i in range(tp["requests"])]
        sp = SamplingParams(max_tokens=tp["output"], temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        n = sum(len(r.outputs[0].token_ids) for r in res)
        out["throughput"] = {**tp, "seconds": dt, "output_tokens": n, "output_tokens_per_s": n / dt}
    logging.getLogger("vllm").removeHandler(cap)
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    return out


if __name__ == "__main__":
    raise SystemExit(main())

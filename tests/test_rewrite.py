"""`kvpass rewrite`: native and kvpass outputs give the logits of optimize() in memory; the
source is never touched; the output appears only complete; bad input exits 2 with one line."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

import kvpass
from kvpass.assets import models
from kvpass.checkpoint.rewrite import parse_policy
from kvpass.cli import main

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 16


def _tiny_llama(folder: Path, layers: int, seed: int, shard: str | None = None) -> Path:
    """A tiny random Llama with the SmolLM2 tokenizer, saved as an HF folder (safetensors)."""
    tok = tf.AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    kw = {} if shard is None else {"max_shard_size": shard}
    tf.LlamaForCausalLM(cfg).save_pretrained(folder, **kw)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("src") / "tiny", layers=2, seed=0)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _ids():
    return torch.randint(5, 400, (2, 17), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


def test_native_shared_kv_loads_with_stock_transformers(src, tmp_path, capsys):
    before = _digest(src)
    out = tmp_path / "gqa1"
    assert main(["rewrite", str(src), str(out), "--policy", "shared_kv:kv_heads=1"]) == 0
    assert "native" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and cfg["kvpass"]["source"]["sha256"]
    stock = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = models.load(src)
    want = _logits(kvpass.optimize(model, kvpass.SharedKV(kv_heads=1)))
    torch.testing.assert_close(_logits(stock), want, atol=1e-4, rtol=1e-4)
    assert _digest(src) == before


def test_native_window_is_a_mistral_sliding_window(src, tmp_path):
    out = tmp_path / "mistral"
    assert main(["rewrite", str(src), str(out), "--policy", "window:size=6,sinks=0"]) == 0
    stock = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(stock).__name__ == "MistralForCausalLM" and stock.config.sliding_window == 6
    model, _ = models.load(src)
    want = _logits(kvpass.optimize(model, kvpass.Window(6, sinks=0)))
    torch.testing.assert_close(_logits(stock), want, atol=1e-4, rtol=1e-4)
    assert (want - _logits(model)).abs().max() > 1e-3  # the window really changes the result


@pytest.mark.parametrize("policy,form", [
    ("mhc:rank=16,method=whitened,refit=true", kvpass.MHC(rank=16, method="whitened", refit=True)),
    ("shared_kv:kv_heads=1+window:size=6,sinks=2", [kvpass.SharedKV(kv_heads=1), kvpass.Window(6, 2)]),
])
def test_kvpass_checkpoint_equals_optimize_in_memory(src, tmp_path, policy, form):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "out"
    assert main(["rewrite", str(src), str(out), "--policy", policy, "--calibration", str(calib)]) == 0
    again = kvpass.from_pretrained(out)
    model, tok = models.load(src)
    fast = kvpass.optimize(model, form, calibration=TEXT, tokenizer=tok)
    torch.testing.assert_close(_logits(again), _logits(fast), atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").exists()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 3-layer tiny Llama saved in several shards."""
    folder = _tiny_llama(tmp_path_factory.mktemp("sharded") / "tiny", layers=3, seed=1, shard="200KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.mark.parametrize("policy,form", [
    ("mhc:rank=12,method=svd", kvpass.MHC(rank=12, method="svd")),
    ("shared_kv:kv_heads=1+sparse:block=4,local=1,global_tokens=1",
     [kvpass.SharedKV(kv_heads=1), kvpass.Sparse(block=4, local=1, global_tokens=1)]),
])
def test_streaming_rewrite_equals_optimize(sharded, tmp_path, capsys, policy, form):
    """Weight-local policies stream layer by layer from the shards; the result is the model
    optimize() gives in memory."""
    out = tmp_path / "streamed"
    assert main(["rewrite", str(sharded), str(out), "--policy", policy]) == 0
    assert "layer by layer" in capsys.readouterr().out
    # the layers' shards are packed: a tiny model is one file, as transformers would write it
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    again = kvpass.from_pretrained(out)
    model, _ = models.load(sharded)
    fast = kvpass.optimize(model, form)
    torch.testing.assert_close(_logits(again), _logits(fast), atol=1e-5, rtol=1e-5)
    assert kvpass.kv_bytes_per_token(again) == kvpass.kv_bytes_per_token(fast)


def test_streamed_shards_respect_max_shard_size(sharded, tmp_path, capsys):
    """--max-shard-size splits the packed output; every file is within the limit (or one
    tensor group larger than it), the index covers every tensor, and the model is the same."""
    one, many = tmp_path / "one", tmp_path / "many"
    policy = ["--policy", "shared_kv:kv_heads=1"]
    assert main(["rewrite", str(sharded), str(one), *policy]) == 0
    assert main(["rewrite", str(sharded), str(many), *policy, "--max-shard-size", "150KB"]) == 0
    files = sorted(many.glob("*.safetensors"))
    assert len(files) > 1 and all(f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in files)
    from safetensors import safe_open

    names = set()
    for f in files:
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert names == set(index["weight_map"])
    torch.testing.assert_close(_logits(kvpass.from_pretrained(many)), _logits(kvpass.from_pretrained(one)))
    assert main(["rewrite", str(sharded), str(tmp_path / "bad"), *policy, "--max-shard-size", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


@pytest.mark.parametrize("policy,form", [
    ("mhc:rank=12,method=whitened,refit=true", kvpass.MHC(rank=12, method="whitened", refit=True)),
    ("shared_kv:kv_heads=1,grouping=similarity,merge=calibrated+window:size=6,sinks=2",
     [kvpass.SharedKV(kv_heads=1, grouping="similarity", merge="calibrated"), kvpass.Window(6, 2)]),
    ("mhc:rank=12,method=aware+quantize:bits=4,group=4",
     [kvpass.MHC(rank=12, method="aware"), kvpass.Quantize(bits=4, group=4)]),
])
def test_calibrating_rewrite_streams_and_equals_optimize(sharded, tmp_path, capsys, monkeypatch, policy, form):
    """Calibrating policies stream too: the calibration activations are carried through a
    one-layer twin holding each real layer in turn, each rewritten before the next is fed;
    the result equals optimize() in memory on the same text (which runs the whole model)."""
    import kvpass.checkpoint.stream

    monkeypatch.setattr(kvpass.checkpoint.stream, "_BIG", 1000)  # the MLP/embeddings held only when run
    out = tmp_path / "streamed"
    assert main(["rewrite", str(sharded), str(out), "--policy", policy, "--calibration", TEXT]) == 0
    assert "layer by layer" in capsys.readouterr().out
    again = kvpass.from_pretrained(out)
    model, tok = models.load(sharded)
    fast = kvpass.optimize(model, form, calibration=TEXT, tokenizer=tok)
    torch.testing.assert_close(_logits(again), _logits(fast), atol=1e-5, rtol=1e-5)
    assert (_logits(fast) - _logits(model)).abs().max() > 1e-2
    # calibration matters: another text gives another model
    other = kvpass.optimize(model, form, calibration="A different text altogether, " * 60, tokenizer=tok)
    assert (_logits(other) - _logits(again)).abs().max() > 1e-4


def test_bf16_source_streams_in_fp32_like_the_in_memory_rewrite(tmp_path):
    """A bf16 checkpoint is computed in fp32 layer by layer, as optimize() does after loading
    it in fp32 (a twin in the source's dtype would calibrate on bf16 activations)."""
    tok = tf.AutoTokenizer.from_pretrained(models.resolve("smollm2-135m"))
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(4)
    src = tmp_path / "bf16"
    tf.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
    tok.save_pretrained(src)
    assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
    out = tmp_path / "out"
    assert main(["rewrite", str(src), str(out), "--policy", "mhc:rank=12,method=whitened",
                 "--calibration", TEXT]) == 0
    again = kvpass.from_pretrained(out)
    model, tok = models.load(src)
    fast = kvpass.optimize(model, kvpass.MHC(rank=12, method="whitened"), calibration=TEXT, tokenizer=tok)
    torch.testing.assert_close(_logits(again), _logits(fast), atol=1e-5, rtol=1e-5)


def test_streaming_needs_calibration_and_says_why_not_streamed(sharded, tmp_path, capsys):
    assert main(["rewrite", str(sharded), str(tmp_path / "a"), "--policy", "mhc:rank=12,method=whitened"]) == 2
    assert "pass --calibration" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["rewrite", str(sharded), str(tmp_path / "b"), "--policy", "shared_kv:kv_heads=2,cross_layer=2"]) == 0
    assert "in memory (forms ['shared_kv']" in capsys.readouterr().out
    assert main(["rewrite", str(sharded), str(tmp_path / "c"), "--policy", "mhc:rank=12,method=svd",
                 "--calibration", TEXT, "--heal", "1"]) == 0
    assert "in memory (healing" in capsys.readouterr().out


def test_existing_output_is_refused_unless_forced(src, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["rewrite", str(src), str(out), "--policy", "window:size=8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert main(["rewrite", str(src), str(out), "--policy", "window:size=8", "--force"]) == 0
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


def test_bad_sources_exit_2_with_one_line(src, tmp_path, capsys):
    cases = {}
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    cases["truncated"] = (trunc, "truncated")
    noconf = tmp_path / "noconf"
    shutil.copytree(src, noconf)
    (noconf / "config.json").unlink()
    cases["no config"] = (noconf, "config.json")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cases["pickle"] = (pickled, "--allow-pickle")
    shapes = tmp_path / "shapes"
    shutil.copytree(src, shapes)
    cfg = json.loads((shapes / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (shapes / "config.json").write_text(json.dumps(cfg))
    cases["shapes"] = (shapes, "config.json implies")
    for what, (folder, needle) in cases.items():
        out = tmp_path / f"out-{what.replace(' ', '-')}"
        assert main(["rewrite", str(folder), str(out), "--policy", "window:size=8"]) == 2, what
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err, (what, err)
        assert not out.exists()


def test_kill_9_leaves_no_partial_output(src, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kvpass.cli", "rewrite", str(src), str(out),
                             "--policy", "mhc:rank=16,method=svd"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if out.exists() or any(p.name.startswith(".killed.kvpass-tmp-") for p in tmp_path.iterdir()):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    # killed while writing: OUT is absent, or (if the rename won the race) complete
    if out.exists():
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "tokenizer.json"} <= names
        assert "model.safetensors" in names or "model.safetensors.index.json" in names


def test_policy_shorthand_and_errors():
    p = parse_policy('{"version": 1, "default": [{"kind": "window", "size": 64, "sinks": 0}]}')
    assert p.default == (kvpass.Window(64, 0),)
    with pytest.raises(kvpass.PolicyError, match="unknown form"):
        parse_policy("windw:size=3")
    with pytest.raises(kvpass.PolicyError, match="key=value"):
        parse_policy("window:64")


def test_shard_writer_copies_tensors_through_undecoded(tmp_path):
    """write_shard mixes new tensors and byte ranges of another safetensors file; what it writes
    reads back (safetensors itself) as the same tensors; a truncated source is an error."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvpass.checkpoint.stream import _Reader, write_shard

    g = torch.Generator().manual_seed(0)
    src = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g),
           "c": torch.arange(6).view(2, 3), "d": torch.zeros(0, 4, dtype=torch.float16)}
    save_file(src, str(tmp_path / "src.safetensors"))
    reader = _Reader(dict.fromkeys(src, tmp_path / "src.safetensors"))
    new = {"n": torch.randn(2, 3, generator=g).to(torch.bfloat16), "m": torch.ones(1, dtype=torch.int8)}
    write_shard(tmp_path / "out.safetensors", {**{k: reader.raw(k) for k in src}, **new})
    assert (tmp_path / "out.safetensors").read_bytes()[:8] != b""
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as h:
        assert sorted(h.keys()) == sorted([*src, *new])
        for k, v in {**src, **new}.items():
            assert torch.equal(h.get_tensor(k), v) and h.get_tensor(k).dtype == v.dtype
    data = (tmp_path / "src.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:8 + int.from_bytes(data[:8], "little") + 8])
    cut = _Reader(dict.fromkeys(src, tmp_path / "cut.safetensors"))
    with pytest.raises(kvpass.KVPassError, match="truncated"):
        write_shard(tmp_path / "bad.safetensors", {k: cut.raw(k) for k in src})


def test_force_never_replaces_the_source(tmp_path, capsys):
    """OUT equal to, inside or above SRC is refused even with --force (issue 24: it deleted SRC)."""
    src = _tiny_llama(tmp_path / "p" / "src", layers=1, seed=0)
    before = _digest(src)
    for out in (src, src / "out", src.parent, tmp_path):
        assert main(["rewrite", str(src), str(out), "--policy", "shared_kv:kv_heads=1", "--force"]) == 2
        err = capsys.readouterr().err
        assert "the source" in err and "Traceback" not in err
    assert _digest(src) == before

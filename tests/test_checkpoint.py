"""save_pretrained / from_pretrained: every form round-trips to the same logits (and cache
bytes); writing is atomic and refuses to overwrite; broken checkpoints give one clear error."""

import json

import families as fam
import pytest
import torch

import kvpass
from kvpass.checkpoint.format import CheckpointError

CALIB = torch.randint(1, fam.VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(1, fam.VOCAB, (2, 21), generator=torch.Generator().manual_seed(2))

MIXED = kvpass.Policy(layers={  # one model, a different form on each layer
    0: kvpass.SharedKV(kv_heads=1, grouping="similarity", merge="calibrated"),
    1: [kvpass.MHC(ratio=2, method="whitened", refit=True), kvpass.Window(size=8, sinks=2)],
    2: kvpass.Sparse(block=4, local=1, global_tokens=1, random=1),
    3: [kvpass.SharedKV(kv_heads=1), kvpass.Sparse(block=4, local=2, global_tokens=1)],
})
CASES = {
    "llama-mixed": ("llama", dict(num_hidden_layers=4), MIXED, True),
    "qwen3-cross-layer": ("qwen3", {}, kvpass.SharedKV(cross_layer=2), False),
    "gpt2-mhc-absorbed": ("gpt2", {}, kvpass.MHC(rank=12, method="whitened"), False),
    "gemma3-mhc-aware": ("gemma3", {}, kvpass.MHC(ratio=4, method="aware", allocate=True), False),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", CASES)
def test_round_trip_gives_the_same_logits(case, tmp_path):
    name, kw, policy, heal = CASES[case]
    torch.manual_seed(0)
    model = getattr(fam, name)(**kw).eval()
    fast = kvpass.optimize(model, policy, calibration=CALIB, heal=3 if heal else False)
    out = kvpass.save_pretrained(fast, tmp_path / "ckpt", source={"path": "test"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kvpass"]["source"] == {"path": "test"}
    again = kvpass.from_pretrained(out)
    torch.testing.assert_close(_logits(again, IDS), _logits(fast, IDS), atol=1e-4, rtol=1e-4)
    assert kvpass.kv_bytes_per_token(again) == kvpass.kv_bytes_per_token(fast)
    g = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(again.generate(IDS[:, :9], **g), fast.generate(IDS[:, :9], **g))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    fast = kvpass.optimize(fam.llama().eval(), kvpass.MHC(rank=16, method="svd"))
    path = tmp_path_factory.mktemp("ck") / "mhc"
    kvpass.save_pretrained(fast, path)
    return fast, path


def test_existing_target_is_refused_unless_forced(saved, tmp_path):
    fast, _ = saved
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists"):
        kvpass.save_pretrained(fast, target)
    assert (target / "keep.txt").read_text() == "mine"
    kvpass.save_pretrained(fast, target, force=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


def test_broken_checkpoints_give_one_clear_error(saved, tmp_path):
    import shutil
    _, path = saved
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        kvpass.from_pretrained(bad)
    (bad / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        kvpass.from_pretrained(bad)
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    cfg = json.loads((plain / "config.json").read_text())
    del cfg["kvpass"]
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no 'kvpass' section"):
        kvpass.from_pretrained(plain)
    other = tmp_path / "other"
    shutil.copytree(path, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["kvpass"]["policy"]["default"] = [{"kind": "mhc", "rank": 8, "method": "svd"}]
    cfg["kvpass"]["policy"]["layers"] = {}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match"):
        kvpass.from_pretrained(other)


def test_saving_a_plain_model_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="kvpass.optimize"):
        kvpass.save_pretrained(fam.llama(), tmp_path / "x")

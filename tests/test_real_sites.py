"""Sites of the real pretrained models (installed offline from PyPI)."""

import json
import subprocess
import sys

import pytest
import torch

import kvpass
from kvpass.assets import models

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm():
    return models.load("smollm2-135m")


def test_smollm2_sites(smollm):
    model, _ = smollm
    sites = kvpass.find_sites(model)
    assert len(sites) == 30
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites} == {(9, 3, 64)}
    assert all(s.ok and s.causal and s.window is None and s.positional == "rope:rotate_half" for s in sites)
    assert sites[0].kv_head_map == (0, 0, 0, 1, 1, 1, 2, 2, 2)


def test_smollm2_identity_is_exact(smollm):
    model, tok = smollm
    fast = kvpass.optimize(model)
    ids = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (fast(ids).logits - model(ids).logits).abs().max() <= 1e-4
    greedy = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **greedy), fast.generate(ids, **greedy))


def test_gemma3_sites():
    model, _ = models.load("gemma3-270m")
    sites = kvpass.find_sites(model)
    assert len(sites) == 18
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites} == {(4, 1, 256)}
    windows = [s.window for s in sites]
    assert windows.count(512) == 15 and windows.count(None) == 3
    assert all(s.q_norm and s.k_norm and s.ok for s in sites)


def test_minilm_sites():
    model, _ = models.load("minilm-l6")
    sites = kvpass.find_sites(model)
    assert len(sites) == 6
    assert {(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites} == {(12, 12, 32)}
    assert not any(s.causal for s in sites) and all(s.positional == "none" for s in sites)


def test_cli_inspect_json():
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "inspect", "minilm-l6", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["sites"]) == 6 and d["total_kv_bytes_per_token"] == 6 * 2 * 12 * 32 * 4

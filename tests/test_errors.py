"""Bad input: unsupported sites name the module and what did not match; the CLI exits 2."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import kvpass


class AlibiAttention(nn.Module):
    """Adds a symmetric per-head distance bias to the scores (-slope·|i-j|, bidirectional):
    a bias by position that is not linear in the key position."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("slopes", 2.0 ** -torch.arange(1, heads + 1).float())

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (w(x).view(B, S, self.h, self.d).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        pos = torch.arange(S, device=x.device)
        bias = -self.slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()  # [H, S, S]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d) + bias
        return self.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, -1))


class OddKeyAttention(nn.Module):
    """A made-up positional op (sin) on the key path."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (w(x).view(B, S, self.h, self.d).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        k = torch.sin(k)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class Net(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.layers = nn.ModuleList([attn(), attn()])

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_unsupported_site_names_module_and_mismatch():
    torch.manual_seed(0)
    model = Net(OddKeyAttention).eval()
    sites = kvpass.find_sites(model)
    assert len(sites) == 2
    assert sites[1].problems and sites[1].problems[0].startswith("layers.1")
    assert any("'sin'" in p for p in sites[1].problems)
    with pytest.raises(kvpass.SiteError, match=r"layers\.0.*.sin."):
        kvpass.optimize(model, kvpass.SharedKV(kv_heads=1))
    kept = kvpass.optimize(model, kvpass.Full())
    ids = torch.randint(0, 50, (2, 7))
    assert (kept(ids) - model(ids)).abs().max() < 1e-5
    # only the key path is not understood: the core is kvpass's, forms that change no weights apply
    assert not kept._kvpass.kept and sites[1].core_ok
    win = kvpass.optimize(kept, kvpass.Window(4, sinks=1))
    assert win._kvpass.counters["window"] == 2


def test_score_bias_not_alibi_passes_through_and_refuses_positional_forms():
    """A bias by position that kvpass cannot recompute at other positions joins the mask: Full
    and SharedKV apply (exact / merged); Window is refused naming the layer and the bias."""
    torch.manual_seed(0)
    model = Net(AlibiAttention).eval()
    sites = kvpass.find_sites(model)
    assert len(sites) == 2 and all(s.ok and s.alibi is None for s in sites)
    assert sites[1].positional_problems[0].startswith("layers.1") and "not ALiBi" in sites[1].positional_problems[0]
    ids = torch.randint(0, 50, (2, 7))
    assert (kvpass.optimize(model)(ids) - model(ids)).abs().max() < 1e-5
    assert kvpass.optimize(model, kvpass.SharedKV(kv_heads=1))._kvpass.counters["shared_kv"] == 2
    with pytest.raises(kvpass.SiteError, match=r"layers\.0.*not ALiBi"):
        kvpass.optimize(model, kvpass.Window(4))


def test_no_attention_at_all():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(kvpass.SiteError, match="no attention"):
        kvpass.optimize(model, example_inputs=(torch.zeros(1, 4, dtype=torch.long),))


def test_cli_bad_path_exits_2(tmp_path):
    for arg in (str(tmp_path / "missing"), str(tmp_path)):
        r = subprocess.run([sys.executable, "-m", "kvpass.cli", "inspect", arg],
                           capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.strip().count("\n") <= 1 and "Traceback" not in r.stderr
        assert "kvpass: error:" in r.stderr


def test_cli_help_explains():
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "inspect", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "bundled name" in r.stdout and "--json" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "rewrite", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for kind, cls in kvpass.FORMS.items():  # every form and its keys, from the classes themselves
        line = next(x for x in r.stdout.splitlines() if x.split()[:1] == [kind])
        assert all(f.name in line for f in dataclasses.fields(cls)), line


def test_cli_kernels_dump_and_bad_spec():
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "kernels", "--heads", "4", "--kv-heads", "2",
                        "--head-dim", "32", "--causal", "--window", "16", "--sinks", "2", "--dump"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "import triton" in r.stdout and '"window":16' in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "kernels", "--head-dim", "7"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "head_dim=7" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "kernels", "--causal", "--quant-bits", "4",
                        "--kind", "decode", "--dump"], capture_output=True, text=True)
    assert r.returncode == 0 and "QMASK" in r.stdout and "def attn_decode_split" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "kernels", "--quant-bits", "4"],
                       capture_output=True, text=True)  # prefill of quantized storage: not generated
    assert r.returncode == 2 and "decode kernels only" in r.stderr and "Traceback" not in r.stderr

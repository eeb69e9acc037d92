"""Issue 24: every bad input is one line on stderr and exit 2; concurrent, interrupted and
size-limited rewrites lose nothing; fuzzed policies, safetensors and GGUF files give a
KVPassError or load, never another exception, never a change to the source."""

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rewrite import _digest, _tiny_llama

import kvpass
from kvpass.assets.models import check_gguf
from kvpass.checkpoint.format import files_sha256, out_lock
from kvpass.checkpoint.rewrite import check_safetensors, parse_policy
from kvpass.cli import main
from kvpass.ir.policy import Policy

POLICY = ["--policy", "shared_kv:kv_heads=1"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("bad") / "tiny", layers=2, seed=0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("bad") / "sharded", layers=2, seed=0, shard="200KB")


def _one_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("kvpass: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _copy(src: Path, to: Path) -> Path:
    shutil.copytree(src, to)
    return to


def _bad_offset(folder: Path) -> None:
    """Shift one tensor's end offset in the header (same header length): safetensors' own
    'invalid shape, data type, or offset' error."""
    w = folder / "model.safetensors"
    b = bytearray(w.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    name = next(k for k in head if k != "__metadata__")
    head[name]["data_offsets"][1] += 4
    text = json.dumps(head, separators=(",", ":")).encode()
    b[8:8 + n] = text + b" " * (n - len(text))
    w.write_bytes(bytes(b))


def test_each_case_of_the_issue_is_one_line_and_exit_2(src, sharded, tmp_path, capsys):
    off = _copy(src, tmp_path / "offset")
    _bad_offset(off)
    assert main(["rewrite", str(off), str(tmp_path / "o1"), *POLICY]) == 2
    _one_line(capsys, "model.safetensors", "byte range")

    trunc = _copy(src, tmp_path / "trunc")
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    assert main(["inspect", str(trunc)]) == 2
    _one_line(capsys, "model.safetensors", "truncated")

    gone = _copy(sharded, tmp_path / "missing-shard")
    shard = sorted(json.loads((gone / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    (gone / shard).unlink()
    assert main(["rewrite", str(gone), str(tmp_path / "o2"), *POLICY]) == 2
    _one_line(capsys, shard, "index.json")

    notok = _copy(src, tmp_path / "no-tokenizer")
    for p in notok.iterdir():
        if "token" in p.name:
            p.unlink()
    assert main(["rewrite", str(notok), str(tmp_path / "o3"), *POLICY]) == 2
    _one_line(capsys, "no tokenizer files")

    assert main(["eval", str(src), "--text", str(tmp_path / "missing.txt")]) == 2
    _one_line(capsys, "missing.txt")

    vocab = tmp_path / "vocab-only.gguf"
    _gguf(vocab, layers=0, tensors=False)
    assert main(["inspect", str(vocab)]) == 2
    _one_line(capsys, "vocab-only.gguf", "no tensors")

    assert main(["rewrite", str(src), str(tmp_path / "o4"), "--policy", str(tmp_path / "nope.yaml")]) == 2
    _one_line(capsys, "nope.yaml", "not found")
    assert main(["rewrite", str(src), str(tmp_path / "o5"), "--policy",
                 '{"version": 1, "default": [{"kind": "window", "size": -3}]}']) == 2
    assert "not valid JSON" not in _one_line(capsys, "Window.size")
    for o in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / o).exists()


@pytest.mark.parametrize("layers, needle", [(3, "initialised at random"), (1, "has no place for")])
def test_config_and_weights_that_disagree_are_refused(src, tmp_path, capsys, layers, needle):
    bad = _copy(src, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (bad / "config.json").write_text(json.dumps(cfg))
    for extra in ([], ["--in-memory"], ["--heal", "2"]):
        assert main(["rewrite", str(bad), str(tmp_path / "out"), *POLICY, *extra]) == 2
        _one_line(capsys, needle)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_one_line(src, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["rewrite", str(src), str(blocker / "out"), *POLICY]) == 2
    _one_line(capsys, "a-file")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(["rewrite", str(src), str(ro / "out"), *POLICY]) == 2
            _one_line(capsys, "ro")
        finally:
            ro.chmod(0o755)


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "kvpass.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _no_strays(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.kvpass-")]


def test_disk_full_is_one_line_and_leaves_nothing(src, tmp_path):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as on a full
    disk) while the weights are written."""
    out = tmp_path / "full"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
            "from kvpass.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "rewrite", str(src), str(out), *POLICY],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("kvpass: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "File too large" in lines[0], r.stderr
    assert not out.exists() and not _no_strays(tmp_path, "full")


@pytest.fixture
def tmpfs(tmp_path, src):
    """A real tmpfs (root only), smaller than the rewrite's output: the disk is really full."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    need = sum(p.stat().st_size for p in src.iterdir())
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need // 2}", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE test covers the same path)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("how", [[], ["--in-memory"]])
def test_disk_full_on_a_real_tmpfs(src, tmpfs, how):
    out = tmpfs / "out"
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "rewrite", str(src), str(out), *POLICY, *how],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("kvpass: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "No space left" in lines[0], r.stderr
    assert not out.exists() and not _no_strays(tmpfs, "out")
    assert shutil.disk_usage(tmpfs).used < 64 * 1024  # nothing half-written is left behind


def _poison(folder: Path, name: str) -> str:
    """Overwrite 64 bytes in the middle of a float tensor's payload with 0xFF (NaN in every
    float format). -> the tensor's name."""
    w = folder / "model.safetensors"
    b = bytearray(w.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    a, e = head[name]["data_offsets"]
    mid = 8 + n + (a + e) // 2 // 8 * 8
    b[mid:mid + 64] = b"\xff" * 64
    w.write_bytes(bytes(b))
    return name


@pytest.mark.parametrize("how", [[], ["--in-memory"]])
def test_nonfinite_payload_is_refused_by_name(src, tmp_path, capsys, how):
    bad = _copy(src, tmp_path / "nan")
    name = _poison(bad, "model.layers.1.mlp.up_proj.weight")
    before = _digest(bad)
    out = tmp_path / "out"
    assert main(["rewrite", str(bad), str(out), *POLICY, *how]) == 2
    _one_line(capsys, name, "NaN/Inf", "--allow-nonfinite")
    assert not out.exists() and not _no_strays(tmp_path, "out") and _digest(bad) == before
    assert main(["rewrite", str(bad), str(out), *POLICY, *how, "--allow-nonfinite"]) == 0
    assert out.is_dir()


def test_two_rewrites_to_one_output_one_wins_whole(src, tmp_path):
    out = tmp_path / "same"
    procs = [_cli(["rewrite", str(src), str(out), "--policy", pol])
             for pol in ("shared_kv:kv_heads=1", "window:size=8")]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert any(w in loser for w in ("another kvpass process", "exists", "appeared")), loser
    assert "Traceback" not in loser
    model = kvpass.from_pretrained(out)  # complete, whichever won
    assert model is not None and not _no_strays(tmp_path, "same")


def test_stale_temporaries_are_cleaned_live_ones_kept(src, tmp_path):
    out = tmp_path / "res"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".res.kvpass-tmp-{dead.pid}-abc").mkdir()
        (tmp_path / f".res.kvpass-tmp-{live.pid}-def").mkdir()
        (tmp_path / ".res.kvpass-lock").write_text(str(dead.pid))  # a dead owner's lock
        (tmp_path / ".res.kvpass-old").mkdir()
        assert main(["rewrite", str(src), str(out), *POLICY]) == 0
        assert sorted(_no_strays(tmp_path, "res")) == [f".res.kvpass-tmp-{live.pid}-def"]
        (tmp_path / ".res.kvpass-lock").write_text(str(live.pid))  # a live owner's lock
        with pytest.raises(kvpass.KVPassError, match=f"pid {live.pid}"):
            with out_lock(out):
                pass
    finally:
        live.kill()
        live.wait()


def test_sigterm_mid_rewrite_leaves_no_output(src, tmp_path):
    out = tmp_path / "term"
    proc = _cli(["rewrite", str(src), str(out), "--policy", "mhc:rank=16,method=svd"])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.startswith(".term.kvpass-tmp-") for p in tmp_path.iterdir()):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=120)
    if rc == 0:  # finished before the signal landed: then OUT is whole
        assert (out / "config.json").exists()
    else:
        assert rc == 143 and not out.exists()
    assert [n for n in _no_strays(tmp_path, "term") if "tmp" in n] == []


# ----------------------------------------------------------------------------------- fuzz
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                    st.sampled_from(["window", "mhc", "shared_kv", "sparse", "quantize", "full", "size", "*",
                                     "0-1", "1-0", "kind", "ratio", "inf", ""]), st.text(max_size=8))
_tree = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(st.sampled_from(
                                                         ["kind", "size", "sinks", "version", "default", "layers",
                                                          "rank", "ratio", "bits", "kv_heads", "x"]) | st.text(
                                                         max_size=5), kids, max_size=5)), max_leaves=12)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=_tree, as_yaml=st.booleans())
def test_fuzz_policy_trees_give_policy_errors_only(tree, as_yaml, tmp_path_factory):
    d = tmp_path_factory.mktemp("pol")
    path = d / ("p.yaml" if as_yaml else "p.json")
    path.write_text(yaml.safe_dump(tree) if as_yaml else json.dumps(tree))
    for attempt in (lambda: Policy.from_dict(tree), lambda: parse_policy(str(path))):
        try:
            attempt()
        except kvpass.KVPassError:
            pass


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["window", "mhc", "shared_kv", "sparse", "quantize", "full", "wndw"]),
                          st.lists(st.tuples(st.text("abcdefghijklmnopqrstuvwxyz_", max_size=9),
                                             st.text("0123456789.-abcinf=:,", max_size=6)), max_size=3)),
                min_size=1, max_size=3))
def test_fuzz_inline_policies_give_policy_errors_only(parts):
    text = "+".join(k + ":" + ",".join(f"{a}={b}" for a, b in kv) for k, kv in parts)
    try:
        parse_policy(text)
    except kvpass.KVPassError:
        pass


def _gguf(path: Path, layers: int = 2, tensors: bool = True) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(max(layers, 1))
    w.add_tokenizer_model("llama")
    w.add_token_list(["<s>", "a", "b"])
    if tensors:
        for i in range(layers):
            w.add_tensor(f"blk.{i}.attn_q.weight", np.full((4, 4), i, np.float32))
        w.add_tensor("token_embd.weight", np.ones((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _corrupt(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, at, value in edits:
        i = at % max(len(b), 1)
        if kind == "flip" and b:
            b[i] = value
        elif kind == "cut":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([value]) * 3
    return bytes(b)


_edits = st.lists(st.tuples(st.sampled_from(["flip", "flip", "cut", "insert"]), st.integers(0, 10 ** 6),
                            st.integers(0, 255)), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("fuzz")
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(3, 5, generator=g), "b": torch.arange(6).view(2, 3),
               "c": torch.randn(4, generator=g).to(torch.bfloat16)}, str(d / "m.safetensors"))
    _gguf(d / "m.gguf")
    return d


def _load_safetensors(path: Path) -> None:
    """check_safetensors accepts a file only if safetensors then loads every tensor it names."""
    from safetensors import safe_open

    shapes = check_safetensors(path)
    try:
        files_sha256([path], check_finite=True)
        finite = True
    except kvpass.KVPassError:
        finite = False
    with safe_open(str(path), "pt") as h:
        assert sorted(h.keys()) == sorted(shapes)
        for k in h.keys():
            t = h.get_tensor(k)
            assert list(t.shape) == list(shapes[k])
            if finite and t.is_floating_point():  # the check missed nothing
                assert torch.isfinite(t).all()


def _load_gguf(path: Path) -> None:
    info = check_gguf(path)
    assert info["layers"] >= 1 and info["tensors"] >= 1


@pytest.mark.parametrize("name, load", [("m.safetensors", _load_safetensors), ("m.gguf", _load_gguf)])
@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_edits)
def test_fuzz_corrupt_files_load_or_kvpass_error(small_files, tmp_path_factory, name, load, edits):
    src = small_files / name
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    bad = tmp_path_factory.mktemp("fz") / name
    bad.write_bytes(_corrupt(src.read_bytes(), edits))
    t0 = time.perf_counter()
    try:
        load(bad)
    except kvpass.KVPassError:
        pass
    assert time.perf_counter() - t0 < 10  # never a hang
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("point", ["after_twin", "mid_layer", "mid_copy"])
def test_kill_9_at_each_point_of_the_streaming_rewrite(src, tmp_path, point):
    """SIGKILL (a fail point: no cleanup runs) after the twin, mid-layer and mid-copy: no OUT,
    the source unchanged, and the next run succeeds and removes the dead run's temporaries."""
    before = _digest(src)
    out = tmp_path / "k"
    r = subprocess.run([sys.executable, "-m", "kvpass.cli", "rewrite", str(src), str(out), *POLICY],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "KVPASS_FAILPOINT": point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not out.exists() and _no_strays(tmp_path, "k")  # the dead run's staging folder (and lock) remain
    assert main(["rewrite", str(src), str(out), *POLICY]) == 0
    assert not _no_strays(tmp_path, "k") and (out / "config.json").exists()
    assert _digest(src) == before
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700

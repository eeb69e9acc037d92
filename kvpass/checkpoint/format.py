"""Saving and loading optimised models: :func:`save_pretrained` / :func:`from_pretrained`.

A kvpass checkpoint is an HF folder: ``model.safetensors`` (the optimised model's own
state_dict: MHC latents instead of K/V projections, merged shared-KV rows, ...), the source
model's ``config.json`` with a ``"kvpass"`` section, and the tokenizer files when given.

The section records the *structure* of every layer, not how it was computed:

- ``policy``: per layer, forms that rebuild the same shapes without calibration -- an MHC
  layer becomes ``MHC(rank=<its rank>, method="svd")`` (rank allocation, whitening, refit and
  healing only changed weights, which the file holds), shared KV becomes contiguous mean
  grouping, windows and sparse patterns are kept as they are;
- ``plans``: each layer's stored heads and head map (similarity grouping picks them from data);
- ``source``: what the checkpoint was made from (path, sha256 of its weight files) when known.

:func:`from_pretrained` builds the source architecture from the config (random init), applies
that structural policy (no calibration), restores the plans, loads the weights (strict: every
tensor must match by name and shape) and refits what depends on weights (the fused-kernel fit
of MHC key paths).  Writing is atomic: a temporary folder beside the target, renamed at the end;
an existing target is refused unless ``force=True``.  Nothing is unpickled.

Example:
    >>> import tempfile, torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> fast = kvpass.optimize(LlamaForCausalLM(cfg).eval(), kvpass.MHC(rank=16, method="svd"))
    >>> out = tempfile.mkdtemp() + "/mhc"
    >>> folder = kvpass.save_pretrained(fast, out)
    >>> again = kvpass.from_pretrained(out)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> bool((again(ids).logits - fast(ids).logits).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import KVPassError
from ..ir.policy import Policy
from ..runtime.attention import KVAttention
from ..runtime.latent import fit_key_path
from ..transform import registry
from ..transform.optimize import optimize
from . import vllm
from .native import native_shared_kv, native_window

__all__ = ["save_pretrained", "save_native", "from_pretrained", "structural_policy", "FORMAT", "files_sha256"]

FORMAT = 1
WEIGHTS = "model.safetensors"


class CheckpointError(KVPassError):
    """A checkpoint cannot be written or read (the message says which file and why)."""


def _layers(model: nn.Module) -> list[KVAttention]:
    mods = [m for m in model.modules() if isinstance(m, KVAttention)]
    if getattr(model, "_kvpass", None) is None or not mods:
        raise CheckpointError("save_pretrained needs a model returned by kvpass.optimize()")
    shared = [m.site.name for m in mods if len(m.kv_core.layers) > 1]
    if shared:
        raise CheckpointError(f"{shared[0]} runs layers {list(mods[0].kv_core.layers)} with one module (its "
                              "weights shared across layers): kvpass checkpoints record one module per layer, "
                              "so saving such a model is not supported in this version")
    return mods


def structural_policy(model: nn.Module) -> Policy:
    """A policy that rebuilds ``model``'s layer shapes without calibration (see module doc)."""
    layers = {}
    for att in _layers(model):
        layers[att.site.layer] = [registry.structural(f, att) for f in att.kv_core.forms]
    return Policy(layers=layers)


def files_sha256(paths, *, check_finite: bool = False) -> str:
    """sha256 over the bytes of ``paths`` (sorted by name): identifies a source checkpoint.

    ``check_finite``: also read every floating-point tensor of the safetensors files among
    ``paths`` (the same single pass over the bytes) and raise :class:`CheckpointError` naming
    the first tensor that holds NaN or Inf (a corrupt payload, e.g. bytes overwritten with
    0xFF, which a rewrite would otherwise copy through unnoticed).

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import save_file
    >>> f = Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> save_file({"w": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)}, str(f))
    >>> len(files_sha256([f]))
    64
    >>> files_sha256([f], check_finite=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvpass.checkpoint.format.CheckpointError: ...w.safetensors: tensor w (BF16 [2]) holds 1 NaN/Inf value(s) of 2: ...
    """
    h = hashlib.sha256()
    bad: list[str] = []
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            spans = _float_spans(f) if check_finite and p.suffix == ".safetensors" else None
            if spans is None:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
                continue
            pos = 0
            f.seek(0)
            for name, dt, shape, start, end in spans:
                _hash_range(f, h, pos, start)
                count = _nonfinite(f, h, start, end, dt)
                if count and len(bad) < 3:
                    bad.append(f"{p}: tensor {name} ({dt} {list(shape)}) holds {count:,} NaN/Inf value(s) of "
                               f"{(end - start) // _FLOAT_BITS[dt][0]:,}")
                elif count:
                    bad.append("")
                pos = end
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    if bad:
        more = f" ({len(bad)} tensors in all)" if len(bad) > 1 else ""
        raise CheckpointError(f"{bad[0]}{more}: a corrupt payload? Pass --allow-nonfinite (Python: "
                              "allow_nonfinite=True) if the checkpoint really stores non-finite values")
    return h.hexdigest()


# itemsize, unsigned numpy view, exponent mask (all ones: Inf or NaN)
_FLOAT_BITS = {"F64": (8, "<u8", 0x7FF0000000000000), "F32": (4, "<u4", 0x7F800000),
               "F16": (2, "<u2", 0x7C00), "BF16": (2, "<u2", 0x7F80)}


def _float_spans(f) -> list[tuple] | None:
    """(name, dtype, shape, file start, file end) of a safetensors file's float tensors, in file
    order; None when the header does not parse (the file is then only hashed)."""
    try:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        spans = [(k, v["dtype"], tuple(v["shape"]), base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
                 for k, v in header.items() if k != "__metadata__" and v.get("dtype") in _FLOAT_BITS]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return sorted(spans, key=lambda s: s[3])


def _hash_range(f, h, start: int, end: int) -> None:
    f.seek(start)
    left = end - start
    while left > 0:
        block = f.read(min(left, 1 << 22))
        if not block:
            return
        h.update(block)
        left -= len(block)


def _nonfinite(f, h, start: int, end: int, dt: str) -> int:
    """Hash bytes [start, end) of ``f`` and count the floats among them whose exponent bits are
    all ones (NaN/Inf), by integer views in numpy (no torch: this runs in a forked child)."""
    import numpy as np

    size, view, mask = _FLOAT_BITS[dt]
    f.seek(start)
    left, count = end - start, 0
    step = (1 << 22) // size * size
    while left > 0:
        block = f.read(min(left, step))
        if not block:
            break
        h.update(block)
        whole = len(block) // size * size
        if whole:
            a = np.frombuffer(block, dtype=view, count=whole // size)
            count += int(np.count_nonzero((a & a.dtype.type(mask)) == a.dtype.type(mask)))
        left -= len(block)
    return count


class BackgroundHash:
    """:func:`files_sha256` computed in a forked process (it only reads files and hashes), so it
    runs on another core while the rewrite works; ``result()`` waits (and raises the
    :class:`CheckpointError` of a non-finite tensor when ``check_finite``).  Inline where fork
    is not available."""

    def __init__(self, paths, *, check_finite: bool = False):
        import multiprocessing as mp

        self.paths = [str(p) for p in paths]
        self.check_finite = check_finite
        self._value = self._error = None
        try:
            ctx = mp.get_context("fork")
        except ValueError:
            self._run_here()
            return
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_hash_child, args=(self.paths, check_finite, send), daemon=True)
        self._proc.start()
        send.close()

    def _run_here(self) -> None:
        try:
            self._value = files_sha256(self.paths, check_finite=self.check_finite)
        except CheckpointError as e:
            self._error = str(e)

    def result(self) -> str:
        if self._value is None and self._error is None:
            try:
                self._value, self._error = self._recv.recv()
            except EOFError:  # the child died: do it here
                self._run_here()
            self._proc.join()
        if self._error is not None:
            raise CheckpointError(self._error)
        return self._value


def _hash_child(paths, check_finite: bool, conn) -> None:
    try:
        conn.send((files_sha256(paths, check_finite=check_finite), None))
    except CheckpointError as e:
        conn.send((None, str(e)))
    conn.close()


def kvpass_section(model: nn.Module, source: dict | None = None) -> dict:
    plans = {str(att.site.layer): plan_record(att.kv_core.plan) for att in _layers(model)}
    return {"format": FORMAT, "policy": structural_policy(model).to_dict(), "plans": plans,
            "source": resolved(source)}


def plan_record(plan) -> dict:
    """The part of a layer's plan the weights do not determine (stored heads, head map)."""
    return {"keep": None if plan.keep is None else list(plan.keep),
            "head_map": None if plan.head_map is None else list(plan.head_map)}


def resolved(source: dict | None) -> dict:
    """``source`` with any :class:`BackgroundHash` replaced by its value."""
    return {k: v.result() if isinstance(v, BackgroundHash) else v for k, v in (source or {}).items()}


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, tokenizer=None,
                    force: bool = False, source: dict | None = None, target: str = "kvpass",
                    native: bool = True) -> Path:
    """Write ``model`` (a :func:`kvpass.optimize` result) as a kvpass checkpoint folder.

    ``tokenizer``: saved beside it when given.  ``source``: recorded in the config (the CLI
    puts the source path and hash there).  ``target="vllm"``: a folder stock vLLM serves (a
    native checkpoint where one exists, else kvpass's vLLM class; :mod:`kvpass.checkpoint.vllm`),
    refused before anything is written when a layer's form is one vLLM cannot run; either way
    :func:`from_pretrained` loads it.  Atomic; refuses an existing ``path`` unless ``force``.
    Returns the folder.
    """
    from safetensors.torch import save_model

    path = Path(path)
    layers = _layers(model)
    vllm.check_target(target)
    if path.exists() and not force:
        raise CheckpointError(f"{path} exists; pass force=True (CLI: --force) to replace it")
    records = None
    if target == "vllm":
        records = vllm.model_records(layers, model._kvpass.kept)  # refuses before writing
        parts = (native_shared_kv(model) or native_window(model)) if native else None
        if parts is not None:
            save_native(model, path, tokenizer, parts, source, force, target=target)
            return path
    with staged(path, force=force) as tmp:
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]  # as transformers' save_pretrained does
        config["kvpass"] = kvpass_section(model, source)
        if records is not None:
            vllm.apply_vllm(config, config["kvpass"], records)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "kvpass": str(FORMAT)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def save_native(fast, out: Path, tok, parts, source: dict | None, force: bool, target: str = "kvpass") -> None:
    """Write a native checkpoint (``parts``: state dict and config changes from
    :mod:`kvpass.checkpoint.native`) that stock transformers (and vLLM) load."""
    from safetensors.torch import save_file

    state, changes = parts
    with staged(out, force=force) as tmp:
        config = fast.config.to_dict()
        config["architectures"] = [type(fast).__name__]
        config.update(changes)
        section = kvpass_section(fast, source)
        section["native"] = True
        if target != "kvpass":
            section["target"] = target
        config["kvpass"] = section
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        seen, tensors = set(), {}
        for name, t in state.items():  # tied weights: keep one copy (transformers re-ties them)
            key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
            if key is not None and key in seen:
                continue
            seen.add(key)
            tensors[name] = t.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok is not None:
            tok.save_pretrained(tmp)


@contextlib.contextmanager
def staged(path: Path, force: bool = False):
    """Write a folder atomically: yields a fresh temporary folder beside ``path`` (same
    filesystem), renamed to ``path`` when the block ends normally, removed otherwise.

    Holds :func:`out_lock` on ``path`` meanwhile; a ``path`` that exists when the block ends
    (another process published it) is replaced only with ``force``, else a
    :class:`CheckpointError` and this run's folder is removed: ``path`` is always one complete
    result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with out_lock(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.kvpass-tmp-{os.getpid()}-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become OUT's mode: a folder others cannot read
        try:
            yield tmp
            publish(tmp, path, force=force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def publish(tmp: Path, path: Path, force: bool = True) -> None:
    """Rename the complete folder ``tmp`` to ``path``; an existing ``path`` is replaced only
    with ``force`` (moved aside first, removed only after the new one is in place)."""
    if path.exists() or path.is_symlink():
        if not force:
            raise CheckpointError(f"{path} appeared while this run was writing it (another process?); "
                                  "not replacing it: pass --force to replace it")
        old = path.with_name(f".{path.name}.kvpass-old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


_HELD: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def out_lock(path: Path):
    """An exclusive lock on output ``path``: the file ``.NAME.kvpass-lock`` beside it, holding
    this process's pid (created with ``O_EXCL``).  A live owner makes this a
    :class:`CheckpointError` naming its pid; a dead owner's lock is taken over.  While held,
    the temporary folders (``.NAME.kvpass-tmp-PID-*``) of dead processes and a leftover
    ``.NAME.kvpass-old`` are removed; live processes' folders are untouched.  Re-entrant
    within a process."""
    path = Path(path)
    lock = path.with_name(f".{path.name}.kvpass-lock")
    if lock in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _lock_owner(lock)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise CheckpointError(f"{path}: another kvpass process (pid {pid}) is writing it (lock file {lock})"
                                      ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # its owner is gone: stale
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise CheckpointError(f"{path}: could not take the lock {lock}")
    _HELD.add(lock)
    try:
        _clean_stale(path)
        yield
    finally:
        _HELD.discard(lock)
        if _lock_owner(lock) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _clean_stale(path: Path) -> None:
    """Remove temporaries that dead processes left beside ``path`` (called under its lock)."""
    mark = f".{path.name}.kvpass-tmp-"
    for p in path.parent.glob(f"{glob_escape(mark)}*"):
        pid = p.name[len(mark):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(path.with_name(f".{path.name}.kvpass-old"), ignore_errors=True)


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters escaped."""
    import glob

    return glob.escape(text)


def _load_weights(model: nn.Module, shards: list[Path]) -> None:
    """Load safetensors shards into ``model``: every tensor must exist there with its shape,
    and every parameter/buffer must be loaded (tied weights: once is enough)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    want = model.state_dict()
    loaded: set[str] = set()
    for f in shards:
        try:
            sd = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: {str(e).splitlines()[0]}") from e
        for k, t in sd.items():
            if k not in want:
                raise CheckpointError(f"{f}: does not match the structure in config.json "
                                      f"(unexpected tensor {k})")
            if tuple(t.shape) != tuple(want[k].shape):
                raise CheckpointError(f"{f}: does not match the structure in config.json ({k} is "
                                      f"{list(t.shape)}, the model has {list(want[k].shape)})")
        model.load_state_dict(sd, strict=False)
        loaded |= set(sd)
    ptrs = {want[k].data_ptr() for k in loaded}
    missing = [k for k in want if k not in loaded and want[k].data_ptr() not in ptrs]
    if missing:
        raise CheckpointError(f"{shards[0].parent}: does not match the structure in config.json "
                              f"(missing {sorted(missing)[:5]})")


def read_section(path: Path) -> tuple[dict, dict]:
    """(config dict, kvpass section) of a checkpoint folder, with clear errors."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from e
    section = config.get("kvpass")
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}: config.json has no 'kvpass' section (a plain HF checkpoint: "
                              "load it with transformers)")
    if section.get("format") != FORMAT:
        raise CheckpointError(f"{path}: kvpass format {section.get('format')!r}, this version reads {FORMAT}")
    return config, section


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder written by :func:`save_pretrained` (or ``kvpass rewrite``). -> the
    optimised model (eval mode), equal to the one that was saved."""
    import transformers

    path = Path(path)
    config_dict, section = read_section(path)
    archs = [section["hf_architecture"]] if section.get("hf_architecture") else config_dict.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CheckpointError(f"{path}: config.json names no transformers architecture ({archs!r})")
    if section.get("native"):  # a stock transformers checkpoint (kvpass rewrite wrote it so)
        return cls.from_pretrained(path, dtype=dtype or torch.float32).eval()
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded (kvpass rewrite streams layer by layer)
        try:
            shards = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index: {e}") from e
    else:
        shards = [path / WEIGHTS]
    for f in shards:
        if not f.is_file():
            raise CheckpointError(f"{path}: no {f.name}")
    config_dict = {k: v for k, v in config_dict.items() if k != "kvpass"}
    config = transformers.AutoConfig.for_model(**config_dict)
    torch.manual_seed(0)
    model = cls(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    fast = optimize(model, Policy.from_dict(section["policy"]), inplace=True)
    by_layer = {att.site.layer: att for att in _layers(fast)}
    for layer, plan in section.get("plans", {}).items():
        core = by_layer[int(layer)].kv_core
        core.plan = dataclasses.replace(
            core.plan, keep=None if plan["keep"] is None else tuple(plan["keep"]),
            head_map=None if plan["head_map"] is None else tuple(plan["head_map"]))
    _load_weights(fast, shards)
    for att in by_layer.values():
        lat = att.kv_core.latent
        if lat is not None and not lat.absorbed:
            try:
                lat.fit, lat.fit_error = fit_key_path(lat), None
            except KVPassError as e:
                lat.fit, lat.fit_error = None, str(e)
    fast._kvpass.source = section.get("source", {})
    return fast.eval()

"""Streaming checkpoint rewrite: one decoder layer in memory at a time.

Used by ``kvpass rewrite`` when every form of the policy changes a layer from that layer's own
weights and inputs: all forms except cross-layer sharing (``SharedKV(cross_layer>1)``) and MHC
rank allocation (``allocate=True``), and no healing.  Those need several layers at once and go
through the in-memory path.

How: a *structural twin* is built from the source config -- one decoder layer with the same
attention shapes -- and captured once (``optimize(twin)``).  For each real layer ``i``, its
tensors are read from the shards into the twin's layer, the passes run on it (re-planning the
twin's capture), and the rewritten attention tensors, renamed to layer ``i``, go to that
layer's output shard; the layer's other tensors are copied through.  Peak memory is about one
layer (source + rewritten) plus the twin, whatever the model's depth.

Calibrating policies (whitened/aware MHC, refit, similarity grouping, calibrated merge) carry
the calibration activations through the layers: the twin then has the real MLP and, as its
vocabulary, only the calibration text's tokens (their embedding rows read from the shards, so
everything the model computes before its first layer -- embedding scale, positions, masks --
is its own).  The first layer's calls are recorded once; for each layer ``i`` (loaded whole),
the attention's inputs are recorded from the block's calls and handed to the passes
(:class:`kvpass.transform.calibrate.RecordedCalls`), and the block, *as rewritten*, then turns the
hidden states into layer ``i + 1``'s -- the same order and the same activations as
``optimize()`` in memory (the results are equal).  Memory: the MLP (and the embeddings, once
the first layer's inputs are recorded) is out of memory while the passes run and read only to
carry the activations, so the peak is the larger of (attention + the passes' work) and (one
fp32 layer), plus the activations (two copies of ``tokens x hidden`` fp32; the summary's
``calibration_bytes``).

Speed: tensors the passes do not touch (most of the bytes: MLPs, embeddings) are copied
through by a second thread as undecoded byte ranges (``os.copy_file_range``) into their own
shards, while the main thread builds and captures the twin and rewrites attention; the twin
is built without random initialisation (layer 0's real tensors go in).  Measured by
``bench/rewrite_scale.py`` (Llama-3-8B layer shapes, bf16, 4 layers, 2.15 GB, 2 CPU cores):
``SharedKV(kv_heads=4)`` 5.7 s = 376 MB/s (was 179 MB/s decoding and re-encoding every tensor
in one thread); at full depth (32 layers, 14.4 GB) 612 MB/s.  Each layer's passes work on a
copy of the twin that shares the layer's attention tensors instead of cloning them
(:func:`_working_copy`).

The twin must be able to stand in for every layer: the config needs ``num_hidden_layers`` and
all layers of one kind (``layer_types``, if present, all equal); the attention module's path
must hold the layer index as its one numeric segment.  When something does not fit,
:func:`plan` says why and the caller falls back to the in-memory rewrite.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..assets.models import is_causal_lm_config
from ..errors import KVPassError
from ..ir.policy import Policy
from ..runtime.accounting import kv_bytes_per_token, kv_cache_bytes
from ..runtime.attention import KVAttention
from ..transform import registry
from ..transform.calibrate import RecordedCalls, calibration_ids, calls_into, hidden_key, layer_inputs
from ..transform.optimize import optimize
from ..transform.registry import needs_calibration
from . import vllm
from .format import FORMAT, plan_record, resolved, staged
from .native import native_shared_kv, window_changes

__all__ = ["plan", "stream_rewrite", "StreamPlan", "pack_shards"]

_TWIN = {"intermediate_size": 16, "vocab_size": 256}


@dataclass
class StreamPlan:
    config: dict  # the source config (dict)
    twin_config: object
    layers: int
    reason: str | None = None  # why not streamable (None: streamable)
    calibrate: bool = False  # some form calibrates: activations are carried through the layers


def plan(folder: Path, policy: Policy, heal: int) -> StreamPlan:
    """Whether ``policy`` can be applied to the checkpoint in ``folder`` layer by layer."""
    cfg = json.loads((folder / "config.json").read_text())
    n = cfg.get("num_hidden_layers")
    out = StreamPlan(cfg, None, n or 0)
    forms = set(policy.default).union(*policy.layers.values())
    out.calibrate = any(needs_calibration(f) for f in forms)
    if heal:
        out.reason = "healing trains on activations"
    elif not isinstance(n, int) or n < 1:
        out.reason = "config has no num_hidden_layers"
    elif len(set(cfg.get("layer_types") or ["one"])) != 1:
        out.reason = "layers of different kinds (layer_types)"
    else:
        bad = sorted({f.kind for f in forms if not registry.streamable(f)})
        if bad:
            out.reason = f"forms {bad} (as configured) need several layers at once (cross-layer, allocate)"
    if out.reason is None:
        try:
            out.twin_config = twin_config(cfg, _TWIN["vocab_size"], mlp=not out.calibrate)
        except Exception as e:  # noqa: BLE001
            out.reason = f"cannot build a one-layer twin from the config ({type(e).__name__})"
    return out


def twin_config(cfg: dict, vocab: int, *, mlp: bool):
    """The one-layer twin's config: ``vocab`` tokens; a tiny MLP when ``mlp`` (the layer's
    real MLP is needed only to carry calibration activations)."""
    import transformers as tf

    small = dict(_TWIN, vocab_size=vocab) if mlp else {"vocab_size": vocab}
    twin = dict(cfg, num_hidden_layers=1, **{k: v for k, v in small.items() if k in cfg})
    if cfg.get("layer_types"):
        twin["layer_types"] = cfg["layer_types"][:1]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = twin.get(key)
        if isinstance(ids, int) and ids >= vocab or isinstance(ids, list):
            twin[key] = None
    twin.pop("kvpass", None)
    return tf.AutoConfig.for_model(**twin)


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update(dict.fromkeys(h.keys(), f))
    return out


class _Reader:
    """Tensors by name from the source shards (files opened lazily, one at a time), and where
    each tensor's bytes lie (for copying them through undecoded)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._headers: dict[Path, tuple[int, dict]] = {}

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read with plain file reads into its own memory (no memory map: a mapped
        shard's touched pages would count as this process's memory until it is closed)."""
        r = self.raw(name)
        buf = bytearray(r.size)
        with open(r.path, "rb") as h:
            h.seek(r.offset)
            if h.readinto(buf) != r.size:
                raise KVPassError(f"{r.path}: truncated in {name}")
        if not r.size:
            return torch.empty(r.shape, dtype=_TORCH_DTYPES[r.dtype])
        return torch.frombuffer(buf, dtype=_TORCH_DTYPES[r.dtype]).view(r.shape)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (sorted) of a tensor, read without loading the rest (the embedding
        rows of the calibration tokens, not the whole vocabulary)."""
        r = self.raw(name)
        dtype = _TORCH_DTYPES[r.dtype]
        row = r.size // r.shape[0]
        buf = bytearray(row * len(index))
        with open(r.path, "rb") as h:
            for j, i in enumerate(index.tolist()):
                got = os.pread(h.fileno(), row, r.offset + i * row)
                if len(got) != row:
                    raise KVPassError(f"{r.path}: truncated in {name}")
                buf[j * row:(j + 1) * row] = got
        return torch.frombuffer(buf, dtype=dtype).view(len(index), *r.shape[1:])

    def raw(self, name: str) -> _Raw:
        f = self.files[name]
        if f not in self._headers:
            with open(f, "rb") as h:
                n = struct.unpack("<Q", h.read(8))[0]
                self._headers[f] = (8 + n, json.loads(h.read(n)))
        start, header = self._headers[f]
        e = header[name]
        b, end = e["data_offsets"]
        return _Raw(f, e["dtype"], tuple(e["shape"]), start + b, end - b)


@dataclass
class _Raw:
    """A tensor's bytes in a safetensors file, copied to the output without decoding."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    size: int


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def failpoint(name: str) -> None:
    """Fault injection for the kill tests: with ``KVPASS_FAILPOINT=name`` in the environment
    this process SIGKILLs itself here (``after_twin``, ``mid_layer``, ``mid_copy``): no cleanup
    runs, exactly as under ``kill -9``.  A no-op otherwise."""
    if os.environ.get("KVPASS_FAILPOINT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_shard(path: Path, entries: dict[str, torch.Tensor | _Raw]) -> None:
    """Write a safetensors file from tensors and undecoded byte ranges of other safetensors files.

    The format: an 8-byte little-endian header size, a JSON header (names -> dtype, shape, data
    offsets; padded with spaces to 8 bytes), then the data.  Byte ranges are copied file to
    file by the kernel (``os.copy_file_range``), never through Python objects: copying a
    layer's MLP through costs no decode and no re-encode.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    items = []
    for name, e in entries.items():
        if isinstance(e, torch.Tensor):
            e = e.detach().contiguous().cpu()
            dt, shape, size = _ST_DTYPES[e.dtype], tuple(e.shape), e.numel() * e.element_size()
        else:
            dt, shape, size = e.dtype, e.shape, e.size
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + size]}
        items.append(e)
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for e in items:
            if isinstance(e, torch.Tensor):
                if e.numel():
                    out.write(memoryview(e.view(torch.uint8).numpy()))
                continue
            out.flush()
            failpoint("mid_copy")  # a copied byte range half written
            with open(e.path, "rb") as src:
                left, pos = e.size, e.offset
                while left:
                    n = _copy_range(src, out, left, pos)
                    left, pos = left - n, pos + n


def pack_shards(folder: Path, weight_map: dict[str, str], max_bytes: int) -> dict[str, str]:
    """Merge the small shards the layers were written to (two per layer) into as few files of at
    most ``max_bytes`` as the order allows (a larger shard stays alone), named as transformers
    names them (``model.safetensors`` when one is enough).  Bytes move file to file
    (:func:`write_shard` with byte ranges); each small shard is removed once merged, so the
    extra disk is one output file.  -> the new weight map."""
    by_file: dict[str, list[str]] = {}
    for k, f in weight_map.items():
        by_file.setdefault(f, []).append(k)
    groups, cur, size = [], [], 0
    for f in sorted(by_file):
        n = (folder / f).stat().st_size
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += n
    if cur:
        groups.append(cur)
    new_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        if len(group) == 1:
            (folder / group[0]).rename(folder / name)
        else:
            reader = _Reader({k: folder / f for f in group for k in by_file[f]})
            part = folder / (name + ".part")
            write_shard(part, {k: reader.raw(k) for f in group for k in by_file[f]})
            for f in group:
                (folder / f).unlink()
            part.rename(folder / name)
        new_map.update(dict.fromkeys((k for f in group for k in by_file[f]), name))
    return new_map


def _copy_range(src, out, count: int, offset: int) -> int:
    try:
        n = os.copy_file_range(src.fileno(), out.fileno(), min(count, 1 << 30), offset)
        if n > 0:
            out.seek(0, os.SEEK_END)
            return n
    except (AttributeError, OSError):
        pass
    src.seek(offset)  # no kernel copy here (other OS / filesystem): read and write
    data = src.read(min(count, 1 << 26))
    if not data:
        raise KVPassError(f"{src.name}: truncated (expected {count} more bytes at offset {offset})")
    out.write(data)
    return len(data)


def _twin(auto, config, reader: _Reader, vocab_rows: torch.Tensor | None = None):
    """The one-layer twin, built without random initialisation (a big layer's init costs
    seconds): tensors the source's layer 0 has with the same name and shape are taken from
    it, the rest (tiny MLP, vocabulary) drawn small.

    ``vocab_rows`` (calibrating): the twin's vocabulary is these source tokens, in order --
    vocabulary-sized tensors (embeddings) get their rows -- and every tensor must come from
    the source (a random one would make the calibration activations meaningless)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # fp32 whatever the source's dtype: the passes compute as in memory
        twin = auto.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    loaded, missing, vocab_loaded = set(), [], False
    with torch.no_grad():
        for name, t in twin.state_dict().items():
            raw = reader.raw(name) if name in reader.files else None
            if raw is not None and raw.shape == tuple(t.shape):
                t.copy_(reader.get(name))  # converts in place: no second copy
            elif (raw is not None and vocab_rows is not None and raw.shape[1:] == tuple(t.shape[1:])
                  and t.dim() and t.shape[0] == len(vocab_rows)):
                t.copy_(reader.rows(name, vocab_rows))
            else:
                missing.append((name, t))
                continue
            loaded.add(t.data_ptr())
            vocab_loaded |= vocab_rows is not None and t.dim() > 0 and t.shape[0] == len(vocab_rows)
        for name, t in missing:
            if t.data_ptr() in loaded or not t.is_floating_point() or name.endswith(("inv_freq", "original_inv_freq")):
                continue  # tied to a loaded tensor, integer or derived buffers
            if vocab_loaded and t.dim() and t.shape[0] == len(vocab_rows):
                t.zero_()  # a tied output head the source stores once (as the embedding): logits unused
                continue
            if vocab_rows is not None:
                raise KVPassError(f"streaming rewrite: the source has no tensor {name} {tuple(t.shape)}; "
                                  "calibrating layer by layer needs every tensor of the model's first layer "
                                  "and embeddings (use --in-memory)")
            t.copy_(torch.ones_like(t) if t.dim() == 1 else torch.randn(t.shape, generator=g) * 0.02)
    return twin


_BIG = 1 << 20  # elements: tensors this big outside the attention (MLP, embeddings) are held only when run


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _working_copy(base: nn.Module, own: list[torch.Tensor]) -> nn.Module:
    """A deep copy of the twin for the passes to rewrite, whose attention tensors (``own``: the
    layer just read in) share the twin's storage instead of being cloned -- the clone was most
    of a layer's time.  The passes may write into them in place: harmless, the next layer's
    tensors are read over them; they may also rebind a tensor (``p.data = smaller``): the
    copy's tensor objects are new, so the twin keeps its own."""
    memo = {}
    for t in own:
        memo[id(t)] = nn.Parameter(t.data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else t.detach()
    return copy.deepcopy(base, memo)


def stream_rewrite(folder: Path, out: Path, policy: Policy, sp: StreamPlan, *, dtype: torch.dtype,
                   native: bool, source: dict, tokenizer, calibration=None, progress: bool = True,
                   force: bool = False, max_shard_size: int = 5 * 10**9, target: str = "kvpass",
                   context: int = 4096) -> dict:
    """Rewrite layer by layer (see module docstring). -> summary (format, KV bytes, the cache
    at ``context`` tokens); an ``out`` that exists when the rewrite is done is replaced only
    with ``force``.  The layers' shards are merged at the end into files of at most
    ``max_shard_size`` bytes (:func:`pack_shards`).  ``target="vllm"``: see
    :mod:`kvpass.checkpoint.vllm` (each layer's forms are checked as it is rewritten)."""
    import transformers as tf

    causal = is_causal_lm_config(sp.config)
    auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
    files = _tensor_files(folder)
    reader = _Reader(files)
    st_dtype = _ST_DTYPES.get(dtype)
    t0 = time.perf_counter()
    ids = vocab = None
    if sp.calibrate:
        if calibration is None:
            raise KVPassError("this policy calibrates (whitened/aware MHC, similarity grouping, calibrated "
                              "merge or refit): pass --calibration TEXT_OR_FILE")
        length, count = registry.calibration_shape(set(policy.default).union(*policy.layers.values()))
        ids = calibration_ids(calibration, tokenizer, length=length, max_chunks=count)
        vocab, ids = torch.unique(ids, return_inverse=True)  # the twin's vocabulary: these tokens
    with staged(out, force=force) as tmp, ThreadPoolExecutor(max_workers=1) as pool:
        if sp.calibrate:
            twin = _twin(auto, twin_config(sp.config, len(vocab), mlp=False), reader, vocab)
        else:
            twin = _twin(auto, sp.twin_config, reader)
        base = optimize(twin, inplace=True)
        failpoint("after_twin")
        sites = [s for s in base._kvpass.sites if s.name]
        if len(sites) != 1:
            raise KVPassError(f"streaming rewrite: the one-layer twin has {len(sites)} attention sites")
        site = sites[0]
        segs = [i for i, s in enumerate(site.name.split(".")) if s.isdigit()]
        if len(segs) != 1:
            raise KVPassError(f"streaming rewrite: cannot tell the layer index in {site.name!r}")
        parts = site.name.split(".")

        def real_name(i: int) -> str:
            return ".".join(p if j != segs[0] else str(i) for j, p in enumerate(parts))

        layer_root = ".".join(parts[: segs[0]])  # e.g. "model.layers"
        n = sp.layers
        per_layer = re.compile(re.escape(layer_root) + r"\.(\d+)\.")
        shard = "model-{:05d}-of-{:05d}.safetensors"
        total_shards = 2 * n + 1
        weight_map: dict[str, str] = {}
        # everything the passes do not touch is copied through by a second thread, undecoded
        # where the dtype stays, while this one rewrites attention: the copy (most of the bytes)
        # overlaps the twin's capture and the passes
        through_reader = _Reader(files)

        def through(k: str):
            raw = through_reader.raw(k)
            return raw if raw.dtype == st_dtype else through_reader.get(k).to(dtype)

        groups = [[k for k in files if not per_layer.match(k)]]
        for i in range(n):
            real = real_name(i)
            groups.append([k for k in files if k.startswith(f"{layer_root}.{i}.") and not k.startswith(real + ".")])
        copies = []
        for j, keys in enumerate(groups):  # shard 1: outside the layers; 2i+2 / 2i+3: layer i's own / copied
            if not keys:
                continue
            name = shard.format(1 + 2 * j, total_shards)
            weight_map.update(dict.fromkeys(keys, name))
            copies.append(pool.submit(lambda keys=keys, name=name:
                                      write_shard(tmp / name, {k: through(k) for k in keys})))
        twin_tensors = dict(base.named_parameters()) | dict(base.named_buffers())
        block = f"{layer_root}.0"  # the twin's one decoder layer
        # each layer loads its attention; calibrating, its whole block (norms, MLP) as well
        prefix = block if sp.calibrate else site.name
        load_keys = [k for k in base.state_dict() if k.startswith(prefix + ".")]
        calls, hidden, calib_bytes = None, None, 0
        if sp.calibrate:  # the calls of the first block on the calibration tokens
            # stopped there: the block runs only when carried; one sequence per call keeps the
            # block's transients (the MLP's inner activations) small
            calls = layer_inputs(base, block, ids, batch_size=1)
            hidden = hidden_key(base, [block], {block: calls})
            if hidden is None or calls[0][hidden].shape[-1] != sp.config.get("hidden_size", -1):
                raise KVPassError(f"streaming rewrite: cannot tell the hidden-state input of {block}")
        # big tensors outside the attention are out of memory while the passes run: the block's
        # (MLP) are read for the carry only, the embeddings are done with
        big = []
        for k, t in base.named_parameters():
            if sp.calibrate and not k.startswith(site.name + ".") and t.numel() > _BIG:
                t.data = torch.empty(0, dtype=t.dtype)
                if k.startswith(block + "."):
                    big.append(k)
        own = [twin_tensors[k] for k in load_keys if k in twin_tensors and k.startswith(site.name + ".")]
        structural, plans, layer_forms = {}, {}, []
        before = kv_bytes_per_token(base) * n
        at_before, at_after = kv_cache_bytes(base, context) * n, 0
        after = 0
        records = []  # kvpass.vllm.layers (target vllm)
        # a native fewer-heads output needs every layer's forms the same SharedKV (else layers
        # sliced to fewer heads would sit in a kvpass checkpoint of the source's shapes)
        per_layer = {policy.forms_for(i, real_name(i)) for i in range(n)}
        uniform_shared = native and len(per_layer) == 1 and [f.kind for f in next(iter(per_layer))] == ["shared_kv"]
        native_kv = None  # stored heads of a native fewer-KV-heads output (None: not native)
        for i in tqdm(range(n), desc="kvpass: rewriting layers (streaming)", disable=not progress):
            if i == n // 2:
                failpoint("mid_layer")  # some layers' shards written, the rest not
            real = real_name(i)
            with torch.no_grad():
                for k in load_keys:
                    name = f"{layer_root}.{i}." + k[len(block) + 1:] if sp.calibrate else real + k[len(site.name):]
                    if k not in twin_tensors:
                        continue
                    if name not in files:
                        raise KVPassError(f"streaming rewrite: the source has no tensor {name}")
                    if k in big:
                        continue
                    twin_tensors[k].copy_(reader.get(name))
            forms = policy.forms_for(i, real)
            recorded = None
            if calls is not None and any(needs_calibration(f) for f in forms):
                try:
                    twin_block = base.get_submodule(block)
                    att_calls = calls_into(base.get_submodule(site.name), [partial(twin_block, **c) for c in calls])
                except RuntimeError as e:
                    raise KVPassError(f"streaming rewrite: {block} runs more than its norms before its attention "
                                      f"({str(e).splitlines()[0]}); use --in-memory") from e
                recorded = RecordedCalls({site.name: att_calls})
                calib_bytes = max(calib_bytes, _tensor_bytes(calls) + _tensor_bytes(att_calls))
            try:
                fast = optimize(_working_copy(base, own), Policy(default=forms), calibration=recorded, inplace=True)
            except KVPassError as e:  # name the real layer, not the twin's
                raise type(e)(str(e).replace(site.name, real)) from e
            recorded = att_calls = None  # freed before the block runs
            att = next(m for m in fast.modules() if isinstance(m, KVAttention))
            after += kv_bytes_per_token(fast)
            at_after += kv_cache_bytes(fast, context)
            layer_forms.append(att.kv_core.forms)
            if target == "vllm":
                records.append(vllm.layer_record(att.kv_core.forms, keep=att.kv_core.plan.keep,
                                                 head_map=att.kv_core.plan.head_map, num_heads=site.num_heads,
                                                 num_kv_heads=site.num_kv_heads, where=real))
            plans[str(i)] = plan_record(att.kv_core.plan)
            nat = native_shared_kv(fast) if uniform_shared else None
            if nat is not None:
                state, changes = nat
                if native_kv not in (None, changes["num_key_value_heads"]):
                    raise KVPassError("streaming rewrite: layers kept different numbers of KV heads")
                native_kv = changes["num_key_value_heads"]
            else:
                state = fast.state_dict()
            new = {real + k[len(site.name):]: v.detach().to(dtype).contiguous()
                   for k, v in state.items() if k.startswith(site.name + ".")}
            structural[i] = [registry.structural(f, att) for f in att.kv_core.forms]
            name = shard.format(2 + 2 * i, total_shards)
            write_shard(tmp / name, new)
            weight_map.update(dict.fromkeys(new, name))
            del att, state, new
            if calls is not None and i + 1 < n:  # carry the hidden state through the rewritten layer
                params = dict(fast.named_parameters())
                with torch.no_grad():
                    for k in big:  # this layer's MLP, for the carry only
                        params[k].data = reader.get(f"{layer_root}.{i}." + k[len(block) + 1:]).float()
                    for c in calls:
                        y = fast.get_submodule(block)(**c)
                        c[hidden] = y[0] if isinstance(y, (tuple, list)) else y
                del params, y  # the MLP goes with them
            del fast
        for c in copies:
            c.result()  # re-raises a failed copy
        weight_map = pack_shards(tmp, weight_map, max_shard_size)
        config = dict(sp.config)
        config.pop("kvpass", None)
        section = {"format": FORMAT, "plans": plans, "source": resolved(source), "streamed": True,
                   "policy": Policy(layers=structural).to_dict()}
        fmt = "kvpass"
        window = window_changes(config, layer_forms) if native else None
        if native_kv is not None and {tuple(f.kind for f in fs) for fs in layer_forms} == {("shared_kv",)}:
            config["num_key_value_heads"] = native_kv
            section["native"], fmt = True, "native"
        elif window is not None:
            config.update(window)
            section["native"], fmt = True, "native"
        elif target == "vllm":
            vllm.apply_vllm(config, section, records)
            fmt = "kvpass (vLLM class)"
        if target != "kvpass":
            section["target"] = target
        config["kvpass"] = section
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files_out = set(weight_map.values())
        if files_out != {"model.safetensors"}:  # one file needs no index
            total = sum((tmp / f).stat().st_size for f in files_out)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"format": fmt, "streamed": True, "seconds_layers": time.perf_counter() - t0, "target": target,
            "calibration_bytes": calib_bytes, "kv_bytes_per_token": {"before": before, "after": after},
            "kv_cache_at_context": {"tokens": context, "before": at_before, "after": at_after}}

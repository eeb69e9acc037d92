"""``kvpass rewrite SRC OUT --policy POLICY``: rewrite a saved checkpoint into a KV-saving one.

The source is read, optimised in memory (:func:`kvpass.optimize`, calibrating and healing
where the policy or ``--heal`` asks) and written as:

- a **native transformers checkpoint** where the result has one: a uniform ``SharedKV`` with
  contiguous groups (no cross-layer sharing) on a model with separate K/V projections becomes
  the same architecture with fewer ``num_key_value_heads`` (the kept heads' merged rows); a
  uniform ``Window(size=W, sinks=0)`` on a Llama source becomes a Mistral config with
  ``sliding_window=W`` (same weights); stock ``AutoModelForCausalLM.from_pretrained(OUT)``
  loads either;
- otherwise a **kvpass checkpoint** (:mod:`kvpass.checkpoint.format`) that
  :func:`kvpass.from_pretrained` loads.

Either way ``config.json`` records the policy and the source (path, sha256 of its weight files)
in its ``kvpass`` section, and the tokenizer files are written beside the weights.

Safety: the source is only read; the output goes to a temporary folder beside ``OUT`` and is
renamed at the end (an interrupted run, even ``kill -9``, leaves no ``OUT``); an existing
``OUT`` is refused unless ``force``; pickle (``.bin``) sources are refused unless
``allow_pickle`` (then loaded by transformers with ``weights_only=True``).

Policies whose forms change each layer from that layer's own weights and inputs -- every
form except cross-layer sharing and MHC rank allocation, and no ``heal`` -- are applied **layer
by layer** from the shards (:mod:`kvpass.checkpoint.stream`: about one layer in memory, calibration
activations carried from layer to layer); the others load the whole model (fp32) and optimise
it in memory.  Both give the same weights.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from ..assets import models
from ..assets.models import is_causal_lm_config
from ..assets.text import bundled_texts, load_text
from ..errors import KVPassError, PolicyError
from ..ir.forms import FORMS, Form
from ..ir.policy import Policy
from ..runtime.accounting import kv_bytes_per_token, kv_cache_bytes
from ..transform.calibrate import is_path_like
from ..transform.optimize import optimize
from . import vllm
from .format import BackgroundHash, CheckpointError, out_lock, save_native, save_pretrained
from .native import ITEMSIZE, native_shared_kv, native_window
from .stream import plan, stream_rewrite

__all__ = ["rewrite", "parse_policy"]


def parse_policy(text: str) -> Policy:
    """A policy from a file (.json/.yaml), inline JSON, or ``kind:key=value,...`` forms joined
    by ``+`` (one composed list for every layer).

    >>> parse_policy("shared_kv:kv_heads=1+window:size=256,sinks=4,sink=logit").default[1]
    Window(size=256, sinks=4, sink='logit')
    >>> parse_policy("shared_kv:kv_heads=1+window:size=256,sinks=4").default[0]
    SharedKV(kv_heads=1, ratio=None, grouping='contiguous', merge='mean', cross_layer=1)
    >>> parse_policy("mhc:ratio=4,method=whitened").default[0].ratio
    4
    """
    if is_path_like(text) and Path(text).suffix in (".json", ".yaml", ".yml"):
        return Policy.from_file(Path(text))
    stripped = text.strip()
    if Path(stripped).suffix in (".json", ".yaml", ".yml") and not stripped.startswith("{"):
        raise PolicyError(f"--policy: policy file {stripped} not found")
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError as e:
            raise PolicyError(f"--policy: not valid JSON: {e}") from e
        return Policy.from_dict(data)
    forms = []
    for part in stripped.split("+"):
        kind, _, args = part.partition(":")
        kind = kind.strip()
        if kind not in FORMS:
            raise PolicyError(f"--policy: unknown form {kind!r} in {text!r}; forms: {sorted(FORMS)} "
                              "(or give a policy file / JSON)")
        d: dict = {"kind": kind}
        for kv in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = kv.partition("=")
            if not eq:
                raise PolicyError(f"--policy: expected key=value, got {kv!r}")
            d[key.strip()] = _value(value.strip())
        forms.append(Form.from_dict(d))
    return Policy(default=forms)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size string (decimal units, as transformers' ``max_shard_size``).

    >>> parse_size("5GB"), parse_size("500MB"), parse_size(1024), parse_size("2.5kb")
    (5000000000, 500000000, 1024, 2500)
    """
    if isinstance(size, int):
        if size <= 0:
            raise CheckpointError(f"max shard size must be positive, not {size}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", str(size).lower())
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}
    if m is None or m.group(2) not in units or float(m.group(1)) <= 0:
        raise CheckpointError(f"not a size: {size!r} (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    return int(float(m.group(1)) * units[m.group(2)])


def _value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    if v.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _source_files(folder: Path) -> tuple[list[Path], list[Path]]:
    return sorted(folder.glob("*.safetensors")), sorted(folder.glob("*.bin"))


def _check_source(src: str, allow_pickle: bool) -> Path:
    folder = models.resolve(src)
    safe, pickled = _source_files(folder)
    if not safe and pickled and not allow_pickle:
        raise CheckpointError(f"{folder}: weights are pickle files ({pickled[0].name}); refusing to "
                              "unpickle them. Pass --allow-pickle to load them with weights_only=True")
    if not safe and not pickled:
        raise CheckpointError(f"{folder}: no weight files (*.safetensors)")
    _check_index(folder)
    shapes = {}
    for f in safe:  # a truncated or corrupt file fails here with its name, before any work
        shapes.update(check_safetensors(f))
    _check_shapes(folder, shapes)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); kvpass "
                              "copies the tokenizer into OUT (so that it loads on its own) and calibrates with it")
    return folder


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                   "tiktoken.model")


def _check_index(folder: Path) -> None:
    """A sharded checkpoint's index must parse and every shard it names must exist."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map): "
                                  f"{type(e).__name__}: {e}") from e
        missing = [f for f in shards if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard {missing[0]}, which is not in {folder}"
                                  + (f" ({len(missing)} shards missing)" if len(missing) > 1 else ""))


def _check_shapes(folder: Path, shapes: dict[str, list[int]]) -> None:
    """Tensor shapes in the files must be those the config implies (transformers would
    re-initialise mismatching tensors with only a warning)."""
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
        auto = tf.AutoModelForCausalLM if is_causal_lm_config(config) else tf.AutoModel
        with torch.device("meta"):
            skeleton = auto.from_config(config)
    except Exception as e:  # noqa: BLE001 -- one clear line for any config problem
        raise CheckpointError(f"{folder}/config.json: cannot build the model it describes: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    sd = skeleton.state_dict(keep_vars=True)
    want = {k: list(v.shape) for k, v in sd.items()}
    prefix = getattr(skeleton, "base_model_prefix", "") or "model"
    variants = (lambda k: (k, k.removeprefix(prefix + "."), f"{prefix}.{k}"))
    unexpected = []
    for name, shape in shapes.items():
        key = next((k for k in variants(name) if k in want), None)
        if key is None:
            unexpected.append(name)
        elif want[key] != list(shape):
            raise CheckpointError(f"{folder}: {name} has shape {list(shape)} in the weights, "
                                  f"config.json implies {want[key]}")
    if not shapes:
        return
    if unexpected:  # e.g. a config with fewer layers than the weights: they would be dropped
        raise CheckpointError(f"{folder}: the weights hold {len(unexpected)} tensor(s) the model in config.json "
                              f"has no place for (first: {unexpected[0]}); config.json and the weights disagree")
    present = {k for n in shapes for k in variants(n)}
    by_param: dict[int, list[str]] = {}  # tied weights: one name of each parameter is enough
    for k, v in sd.items():
        if isinstance(v, torch.nn.Parameter):
            by_param.setdefault(id(v), []).append(k)
    missing = [names[0] for names in by_param.values() if not any(n in present for n in names)]
    if missing:  # e.g. a config with more layers than the weights: transformers would init them randomly
        raise CheckpointError(f"{folder}: config.json implies {len(missing)} parameter(s) the weights do not hold "
                              f"(first: {missing[0]}); they would be initialised at random")


def check_safetensors(path: Path) -> dict[str, list[int]]:
    """``{tensor name: shape}`` of safetensors file ``path``, from its header alone, after
    checking what safetensors would fail on later: the header parses, every tensor's byte range
    is its dtype × shape, the ranges tile the data without gaps or overlaps and the file holds
    exactly that many bytes.  Anything else is a :class:`CheckpointError` naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = []
    for k, v in tensors.items():
        try:
            a, b = (int(x) for x in v["data_offsets"])
            shape = [int(d) for d in v["shape"]]
            item = ITEMSIZE[v["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {k!r} "
                                  f"({type(e).__name__}: {e})") from e
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=0) < 0 or b - a != count * item or a < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: {k} ({v['dtype']} {shape}) has byte range "
                                  f"[{a}, {b}), which is not its size")
        spans.append((a, b, k))
    end = 0
    for a, b, k in sorted(spans):
        if a != end:
            raise CheckpointError(f"{path}: corrupt safetensors header: {k} starts at byte {a}, not {end} "
                                  "(tensors overlap or leave a gap)")
        end = b
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, the header describes {8 + n + end})")
    if 8 + n + end < size:
        raise CheckpointError(f"{path}: {size - 8 - n - end} bytes after the last tensor the header describes "
                              "(corrupt header or appended data)")
    return {k: v["shape"] for k, v in tensors.items()}










def _refuse_overlap(out: Path, sources: list[Path]) -> None:
    """OUT must be neither the source nor inside or above it, ``--force`` or not: replacing it
    would delete the source."""
    o = out.resolve()
    for src in sources:
        if not src.exists():
            continue
        r = src.resolve()
        if o == r or r in o.parents or o in r.parents:
            how = "is" if o == r else "is inside" if r in o.parents else "contains"
            raise CheckpointError(f"{out} {how} the source {src}; write the rewrite to another folder "
                                  "(--force never replaces a source)")


def rewrite(src: str, out: str | os.PathLike, policy: Policy, *, calibration: str | None = None,
            dtype: str = "float32", force: bool = False, allow_pickle: bool = False,
            heal: int = 0, native: bool = True, progress: bool = True, stream: bool = True,
            allow_nonfinite: bool = False, max_shard_size: int | str = "5GB", target: str = "kvpass",
            context: int = 4096) -> dict:
    """Rewrite checkpoint ``src`` into ``out`` (see module docstring). -> a summary dict.

    ``allow_nonfinite``: write even when a floating-point tensor of the source holds NaN/Inf
    (default: a :class:`CheckpointError` naming the tensor, nothing written; the check reads
    the bytes once, in the same background pass that hashes the source).  ``max_shard_size``:
    the largest weight file a streamed rewrite writes (bytes, or ``"5GB"``, ``"500MB"``).
    ``target="vllm"``: a folder stock vLLM serves (:mod:`kvpass.checkpoint.vllm`); forms vLLM
    cannot run are refused before anything is written.  ``context``: the summary reports the
    cache at this many tokens (windows are bounded) besides bytes per token.

    ``stream``: layer by layer from the shards where the policy allows it
    (:mod:`kvpass.checkpoint.stream`); otherwise, or with ``stream=False``, the whole model in memory.
    ``out`` is locked meanwhile (:func:`kvpass.checkpoint.format.out_lock`)."""
    out = Path(out)
    max_bytes = parse_size(max_shard_size)
    vllm.check_target(target)
    if target == "vllm":  # what no layer could serve is refused before any work
        vllm.check_forms(policy.default, "every layer (policy default)")
        for sel, forms in policy.layers.items():
            vllm.check_forms(forms, f"layers {sel!r}")
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass --force to replace it")
    folder = _check_source(src, allow_pickle)
    if isinstance(calibration, str) and calibration in bundled_texts():  # e.g. "persuasion", "calibration"
        calibration = load_text(calibration)
    _refuse_overlap(out, [Path(src), Path(folder)])
    with out_lock(out):  # a second rewrite to the same OUT meanwhile fails at once, naming this one
        if out.exists() and not force:
            raise CheckpointError(f"{out} exists; pass --force to replace it")
        return _rewrite(folder, src, out, policy, calibration=calibration, dtype=dtype, force=force,
                        heal=heal, native=native, progress=progress, stream=stream,
                        allow_nonfinite=allow_nonfinite, max_shard_size=max_bytes, target=target,
                        context=context)


def _rewrite(folder: Path, src, out: Path, policy: Policy, *, calibration, dtype: str, force: bool, heal: int,
             native: bool, progress: bool, stream: bool, allow_nonfinite: bool = False,
             max_shard_size: int = 5 * 10**9, target: str = "kvpass", context: int = 4096) -> dict:
    t0 = time.perf_counter()
    safe, pickled = _source_files(folder)
    digest = BackgroundHash(safe or pickled, check_finite=not allow_nonfinite)
    source = {"path": str(src), "sha256": digest}  # filled in before anything is written
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if stream and not pickled:
        from transformers import AutoTokenizer

        sp = plan(folder, policy, heal)
        if sp.reason is None:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            summary = stream_rewrite(folder, out, policy, sp, dtype=torch_dtype, native=native, source=source,
                                     tokenizer=tok, calibration=calibration,
                                     progress=progress, force=force, max_shard_size=max_shard_size,
                                     target=target, context=context)
            return {"source": str(folder), "out": str(out), "seconds": time.perf_counter() - t0, **summary}
        streamed_reason = sp.reason
    else:
        streamed_reason = "pickle source" if pickled else "stream=False"
    try:
        model, tok = models.load(folder, dtype=torch.float32)
    except KVPassError:
        raise
    except Exception as e:  # noqa: BLE001 -- transformers' many error types: one clear line
        raise CheckpointError(f"{folder}: could not load: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from e
    if pickled and not allow_nonfinite:  # pickle payloads are not read by the hash's check
        bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise CheckpointError(f"{folder}: tensor {bad[0]} holds NaN/Inf values ({len(bad)} tensors in all): "
                                  "a corrupt payload? Pass --allow-nonfinite if the checkpoint really stores them")
    fast = optimize(model, policy, calibration=calibration, tokenizer=tok, heal=heal,
                    progress=progress)
    before, after = kv_bytes_per_token(model), kv_bytes_per_token(fast)
    at = {"tokens": context, "before": kv_cache_bytes(model, context), "after": kv_cache_bytes(fast, context)}
    if torch_dtype != torch.float32:
        fast = fast.to(torch_dtype)
    native_parts = (native_shared_kv(fast) or native_window(fast)) if native else None
    if target == "vllm":
        save_pretrained(fast, out, tokenizer=tok, force=force, source=source, target=target, native=native)
        kind = "native" if native_parts is not None else "kvpass (vLLM class)"
    elif native_parts is None:
        save_pretrained(fast, out, tokenizer=tok, force=force, source=source)
        kind = "kvpass"
    else:
        save_native(fast, out, tok, native_parts, source, force)
        kind = "native"
    return {"source": str(folder), "out": str(out), "format": kind, "seconds": time.perf_counter() - t0,
            "streamed": False, "why_not_streamed": streamed_reason, "target": target,
            "kv_bytes_per_token": {"before": before, "after": after}, "kv_cache_at_context": at}


def main_summary(summary: dict) -> str:
    """One line: what was written, how, and the cache it saves at the summary's context (windows
    stop growing, so bytes per token alone would hide their saving).

    >>> print(main_summary({"out": "o", "format": "kvpass", "streamed": True, "seconds": 1.0,
    ...                     "kv_bytes_per_token": {"before": 46080, "after": 46320},
    ...                     "kv_cache_at_context": {"tokens": 4096, "before": 188743680, "after": 23715840}}))
    ... # doctest: +NORMALIZE_WHITESPACE
    wrote o (kvpass checkpoint, layer by layer) in 1.0s; KV cache at 4,096 tokens 188,743,680 -> 23,715,840
    bytes (7.96x smaller); 46,080 -> 46,320 bytes per stored token
    """
    b = summary["kv_bytes_per_token"]
    how = "layer by layer" if summary.get("streamed") else f"in memory ({summary.get('why_not_streamed')})"
    if summary.get("calibration_bytes"):
        how += f", calibration activations {summary['calibration_bytes'] / 1e6:.0f} MB"
    head = f"wrote {summary['out']} ({summary['format']} checkpoint, {how}) in {summary['seconds']:.1f}s; "
    at = summary.get("kv_cache_at_context")
    if at and at["after"]:
        return (head + f"KV cache at {at['tokens']:,} tokens {at['before']:,} -> {at['after']:,} bytes "
                f"({at['before'] / at['after']:.2f}x smaller); {b['before']:,} -> {b['after']:,} bytes per "
                "stored token")
    return head + f"KV cache {b['before']:,} -> {b['after']:,} bytes/token ({b['before'] / b['after']:.2f}x smaller)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `kvpass rewrite` command")

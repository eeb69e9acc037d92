"""The vLLM target: checkpoints that stock vLLM (``vllm serve OUT``, ``vllm.LLM(OUT)``) serves,
with the KV saving in vLLM's own cache.

``kvpass rewrite SRC OUT --policy P --target vllm`` and ``kvpass.save_pretrained(model, OUT,
target="vllm")`` write, depending on what the policy asks of each layer:

- a **native** checkpoint where the whole result is one that vLLM's stock classes serve: every
  layer ``SharedKV`` to the same head count (fewer ``num_key_value_heads``), or every layer of a
  Llama ``Window(W, sinks=0)`` (Mistral ``sliding_window``);
- otherwise kvpass's **vLLM class** ``KVPassLlamaForCausalLM`` (package :mod:`kvpass_vllm`, which
  vLLM finds through the ``vllm.general_plugins`` entry point when kvpass is installed in its
  environment; no ``trust_remote_code``): the folder is a kvpass checkpoint (so
  :func:`kvpass.from_pretrained` loads it and runs it the same way) whose ``architectures``
  names that class and whose ``kvpass.vllm.layers`` holds one record per layer -- KV heads,
  which stored heads, sliding window, sink logits -- what vLLM sizes its cache by.

What vLLM can express per layer, and so what this target accepts (anything else is refused
before OUT is written, naming the layer, the form and why):

============================  =====================================================================
form                          on vLLM
============================  =====================================================================
``Full()``                    as is
``SharedKV(kv_heads=k)``      ``k`` KV heads in the layer's cache (contiguous query groups)
``Window(W, sinks=0)``        vLLM's per-layer sliding window ``W``
``Window(W, S, sink="logit")``  window ``W`` + per-head sink logits (vLLM's ``sinks``), calibrated to
                              stand in for ``S`` sink tokens
``Window(W, S)`` token sinks  refused: vLLM pins no tokens (use ``sink="logit"``)
``SharedKV(cross_layer>1)``   refused (not in kvpass's vLLM class yet)
``Sparse``                    refused: vLLM has no block-sparse attention for these models
``MHC``                       refused: the MLA export is not implemented yet
``Quantize(format="fp8")``    every layer: vLLM's fp8 KV cache (declared in the checkpoint's
                              ``quantization_config`` as a KV-cache scheme, so no engine option)
``Quantize`` int bits         refused: vLLM stores fp8, not kvpass's int8/int4/int2 groups
============================  =====================================================================

The vLLM class is Llama's (``model_type`` llama: Llama, SmolLM, ...); other architectures get the
native outputs above or a refusal naming the model type.
"""

from __future__ import annotations

from ..errors import PolicyError
from ..ir.forms import Form
from ..runtime.accounting import vllm_request_bytes as serving_bytes

__all__ = ["TARGETS", "ARCHITECTURE", "check_forms", "check_target", "layer_record", "apply_vllm", "refuse_reason",
           "model_records", "serving_bytes"]

TARGETS = ("kvpass", "vllm")
#: a compressed-tensors quantization config with only a KV-cache scheme: vLLM then stores the KV
#: cache as fp8 e4m3 (scale 1: the checkpoint holds no k/v scales) with no engine option;
#: weights stay unquantized
FP8_KV_SCHEME = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {}, "ignore": [],
                 "quantization_status": "frozen",
                 "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                     "symmetric": True}}
ARCHITECTURE = "KVPassLlamaForCausalLM"  # kvpass_vllm.ARCHITECTURE (not imported: that package needs vLLM)
#: source model types whose layers kvpass's vLLM class reproduces
PLUGIN_MODEL_TYPES = ("llama",)


def refuse_reason(form: Form) -> str | None:
    """Why vLLM cannot serve ``form`` (None: it can)."""
    kind = form.kind
    if kind == "full":
        return None
    if kind == "shared_kv":
        return None if form.cross_layer == 1 else ("cross-layer KV sharing (cross_layer>1) is not in kvpass's "
                                                   "vLLM class yet")
    if kind == "window":
        if form.sink == "token" and form.sinks:
            return (f"vLLM pins no sink tokens; use Window({form.size}, sinks={form.sinks}, sink='logit') "
                    "(per-head sink logits, which vLLM runs) or sinks=0")
        return None
    if kind == "sparse":
        return "vLLM has no block-sparse attention for these models"
    if kind == "mhc":
        return "the MLA export of MHC latents is not implemented yet"
    if kind == "quantize":
        if form.format == "fp8":
            return None
        return (f"vLLM stores KV as the model dtype or fp8 (Quantize(format='fp8'), vLLM's kv_cache_dtype='fp8'), "
                f"not kvpass's int{form.bits} groups")
    return f"no vLLM mapping for form kind {kind!r}"


def check_forms(forms, where: str) -> None:
    """Refuse (PolicyError naming ``where`` and the form) any form vLLM cannot serve."""
    for f in forms:
        why = refuse_reason(f)
        if why:
            raise PolicyError(f"--target vllm: {where}: {f!r} cannot be served by vLLM: {why}")
    fp8 = any(f.kind == "quantize" and f.format == "fp8" for f in forms)
    if fp8 and any(f.kind == "window" and f.sink == "logit" for f in forms):
        raise PolicyError(f"--target vllm: {where}: sink logits with an fp8 KV cache: vLLM 0.32's CPU attention "
                          "computes this combination differently from its own bf16/fp32 path (measured on "
                          "SmolLM2: perplexity 41.8 against 49.8 for kvpass's reference on the same folder), so "
                          "the served model would not be the one kvpass measured; use Window(sinks=0) with fp8, "
                          "or no fp8")


def layer_record(forms, *, keep, head_map, num_heads: int, num_kv_heads: int, where: str) -> dict:
    """The ``kvpass.vllm.layers`` record of one layer (see :mod:`kvpass_vllm.llama`)."""
    check_forms(forms, where)
    kept = list(range(num_kv_heads)) if keep is None else list(keep)
    k = len(kept)
    if num_heads % k:
        raise PolicyError(f"--target vllm: {where}: {num_heads} query heads do not split evenly over {k} KV heads")
    if head_map is not None and list(head_map) != [h * k // num_heads for h in range(num_heads)]:
        raise PolicyError(f"--target vllm: {where}: query heads read KV heads {list(head_map)}, not vLLM's "
                          "contiguous groups (SharedKV grouping='similarity' re-lays heads out contiguously; "
                          "this map cannot be served)")
    window = next((f for f in forms if f.kind == "window"), None)
    fp8 = any(f.kind == "quantize" and f.format == "fp8" for f in forms)
    return {"kv_heads": k, "keep": kept, "window": None if window is None else window.size,
            "sink_logits": window is not None and window.sink == "logit", "kv_cache_dtype": "fp8" if fp8 else "auto"}


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise PolicyError(f"target: invalid value {target!r}; allowed: {', '.join(map(repr, TARGETS))}")
    return target


def model_records(layers, kept: dict) -> list[dict]:
    """Records of an optimised model's layers (``layers``: its KVAttention modules in layer
    order; ``kept``: the report's layers left untouched, which vLLM's class cannot tell apart)."""
    if kept:
        name, why = next(iter(kept.items()))
        raise PolicyError(f"--target vllm: {name or '<top>'} was left as it is ({why}); vLLM's class needs every "
                          "attention layer understood")
    return [layer_record(att.kv_core.forms, keep=att.kv_core.plan.keep, head_map=att.kv_core.plan.head_map,
                         num_heads=att.site.num_heads, num_kv_heads=att.site.num_kv_heads, where=att.site.name)
            for att in sorted(layers, key=lambda a: a.site.layer)]


def apply_vllm(config: dict, section: dict, records: list[dict]) -> None:
    """Make a kvpass checkpoint's ``config`` (and its kvpass ``section``) load as kvpass's vLLM
    class with ``records`` (one per layer); HF loading goes through ``section["hf_architecture"]``."""
    mt = config.get("model_type")
    if mt not in PLUGIN_MODEL_TYPES:
        raise PolicyError(f"--target vllm: model type {mt!r}: kvpass's vLLM class serves {list(PLUGIN_MODEL_TYPES)} "
                          "models; for this model vLLM serves only uniform SharedKV (fewer num_key_value_heads) "
                          "from kvpass")
    n = config.get("num_hidden_layers")
    if n != len(records):
        raise PolicyError(f"--target vllm: {len(records)} rewritten attention layers, the config has {n} layers")
    dtypes = {r.get("kv_cache_dtype", "auto") for r in records}
    if len(dtypes) > 1:
        fp8 = [i for i, r in enumerate(records) if r.get("kv_cache_dtype") == "fp8"]
        raise PolicyError(f"--target vllm: layers {fp8} ask for an fp8 KV cache and the others do not; vLLM stores one "
                          "KV dtype for the whole model (kv_cache_dtype): give Quantize(format='fp8') to every layer "
                          "or to none")
    if dtypes == {"fp8"}:  # vLLM picks fp8 KV itself when the checkpoint declares a KV-cache scheme
        config["quantization_config"] = dict(FP8_KV_SCHEME)
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    section["hf_architecture"] = section.get("hf_architecture") or archs[0]
    section["target"] = "vllm"
    section["vllm"] = {"layers": records}
    config["architectures"] = [ARCHITECTURE]

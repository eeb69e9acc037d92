"""``KVPassLlamaForCausalLM``: vLLM's Llama with a KV form per layer.

vLLM's own Llama takes one ``num_key_value_heads`` for every layer and windows only through
``layer_types``; a kvpass rewrite gives each layer its own form.  This class reads them from
``config.kvpass["vllm"]["layers"]`` (written by ``kvpass rewrite --target vllm``), one record
per decoder layer::

    {"kv_heads": 1, "keep": [0], "window": 512, "sink_logits": true}

- ``kv_heads``: the layer's KV heads in vLLM's cache (query head ``h`` reads KV head
  ``h // (heads / kv_heads)``, vLLM's GQA layout; the writer refuses other maps);
- ``keep``: which K/V heads of the checkpoint's projections those are.  The checkpoint keeps
  kvpass's layout (the source's projection shapes, every head of a merged group holding the
  merged rows), so the same folder loads in kvpass (``kvpass.from_pretrained``) and here; the
  loader takes the kept heads' rows;
- ``window``: vLLM's per-layer sliding window (a query sees its last ``window`` tokens), or
  None for full attention;
- ``sink_logits``: the layer has one logit per query head that joins every row's softmax with
  value zero (gpt-oss style); the tensor is the checkpoint's
  ``model.layers.<i>.self_attn.kv_core.sink_logits``.

vLLM sizes each layer's cache from its ``Attention`` (heads, window), so its reported KV-cache
capacity shows the saving.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

__all__ = ["KVPassLlamaForCausalLM", "layer_records", "SINK_SUFFIX"]

SINK_SUFFIX = "self_attn.kv_core.sink_logits"
_KV = re.compile(r"(?:model\.)?layers\.(\d+)\.self_attn\.([kv])_proj\.(weight|bias)$")
_SINK = re.compile(r"(?:model\.)?layers\.(\d+)\." + re.escape(SINK_SUFFIX) + "$")


def layer_records(config) -> list[dict]:
    """The per-layer records of ``config.kvpass['vllm']`` (a clear error when absent)."""
    section = getattr(config, "kvpass", None)
    vllm = section.get("vllm") if isinstance(section, dict) else None
    layers = vllm.get("layers") if isinstance(vllm, dict) else None
    if not isinstance(layers, list) or len(layers) != config.num_hidden_layers:
        raise ValueError("KVPassLlamaForCausalLM: config.json needs a kvpass.vllm.layers list with one record "
                         f"per layer ({config.num_hidden_layers}); write the folder with "
                         "`kvpass rewrite SRC OUT --policy P --target vllm`")
    return layers


class KVPassLlamaAttention(LlamaAttention):
    """Llama attention whose KV heads, window and sink logits come from the layer's record."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "",
                 attn_type: str = AttentionType.DECODER) -> None:
        nn.Module.__init__(self)
        layer = extract_layer_index(prefix)
        rec = layer_records(config)[layer]
        tp = get_tensor_model_parallel_world_size()
        self.hidden_size = hidden_size
        self.total_num_heads = num_heads
        self.num_heads = num_heads // tp
        self.total_num_kv_heads = int(rec.get("kv_heads") or num_kv_heads)
        if num_heads % self.total_num_kv_heads:
            raise ValueError(f"{prefix}: {num_heads} query heads do not split into {self.total_num_kv_heads} "
                             "KV head groups")
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp)
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim ** -0.5
        self.max_position_embeddings = max_position_embeddings
        self.qkv_proj = QKVParallelLinear(hidden_size=hidden_size, head_size=self.head_dim,
                                          total_num_heads=num_heads, total_num_kv_heads=self.total_num_kv_heads,
                                          bias=bias, quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(input_size=num_heads * self.head_dim, output_size=hidden_size,
                                        bias=bias_o_proj, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self._init_rotary_emb(config, quant_config=quant_config)
        extra = {}
        self.sinks = None
        if rec.get("sink_logits"):
            self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32), requires_grad=False)
            extra["sinks"] = self.sinks
        self.attn = Attention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=rec.get("window"), attn_type=attn_type,
                              prefix=f"{prefix}.attn", **extra)


class KVPassLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, attn_layer_type=KVPassLlamaAttention):
        super().__init__(vllm_config, prefix=prefix, config=config, attn_layer_type=attn_layer_type)


class KVPassLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with per-layer KV heads, windows and sink logits (see module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "", layer_type=KVPassLlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        config = self.config
        records = layer_records(config)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        sinks: dict[int, torch.Tensor] = {}

        def kept(weights):
            for name, w in weights:
                if m := _SINK.match(name):
                    sinks[int(m.group(1))] = w
                    continue
                if m := _KV.match(name):
                    keep = records[int(m.group(1))].get("keep")
                    if keep is not None and list(keep) != list(range(heads)):
                        rows = w.reshape(heads, D, -1)[torch.tensor(keep)]
                        w = rows.reshape(len(keep) * D, *w.shape[1:])
                yield name, w

        loaded = set(super().load_weights(kept(weights)))
        rank = get_tensor_model_parallel_rank()
        for i, w in sinks.items():
            att = self.model.layers[i].self_attn
            if att.sinks is None:
                raise ValueError(f"layer {i}: the checkpoint has sink logits but its kvpass.vllm record says none")
            n = att.num_heads
            att.sinks.data.copy_(w.narrow(0, rank * n, n).float())
            loaded.add(f"model.layers.{i}.self_attn.sinks")
        missing = [i for i, layer in enumerate(self.model.layers)
                   if getattr(getattr(layer, "self_attn", None), "sinks", None) is not None and i not in sinks]
        if missing:
            raise ValueError(f"layers {missing}: the kvpass.vllm records ask for sink logits the checkpoint lacks")
        return loaded

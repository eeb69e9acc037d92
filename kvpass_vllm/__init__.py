"""vLLM's side of kvpass: the model class that serves ``kvpass rewrite --target vllm`` outputs.

This package is kvpass's plugin for vLLM (entry point group ``vllm.general_plugins``, declared in
kvpass's ``pyproject.toml``): vLLM calls :func:`register` in every process it starts, which
registers :data:`ARCHITECTURE` with vLLM's model registry (lazily: the class is imported only
when a checkpoint names it).  Installing kvpass into vLLM's environment is all a user does;
no ``trust_remote_code``.

It imports neither kvpass nor anything kvpass needs besides torch and vLLM, so it runs in a
virtual environment that holds vLLM's own transformers (kvpass's tests keep vLLM in
``.venv-vllm``).

What a checkpoint asks of the class lives in ``config.json``'s ``kvpass.vllm`` section, one
record per decoder layer (see :mod:`kvpass_vllm.llama`): ``kv_heads`` (heads stored),
``keep`` (which of the checkpoint's K/V heads they are), ``window`` (sliding window, None for
full attention) and ``sink_logits`` (one learned logit per query head joins every softmax).
"""

from __future__ import annotations

ARCHITECTURE = "KVPassLlamaForCausalLM"

__all__ = ["register", "ARCHITECTURE"]


def register() -> None:
    """Register kvpass's model classes with vLLM (vLLM calls this through the entry point)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "kvpass_vllm.llama:KVPassLlamaForCausalLM")

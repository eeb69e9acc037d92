"""What runs inside a rewritten model: :class:`~kvpass.runtime.core.KVCore` (cache traffic and
attention), :class:`~kvpass.runtime.attention.KVAttention` (the module swapped in), kvpass's
cache layers, MHC latents, model hooks and KV-cache accounting.
"""

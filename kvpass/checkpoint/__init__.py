"""Checkpoints: the kvpass format (save/load), ``kvpass rewrite`` (whole-model and layer-streamed)
and native exports that stock Hugging Face code loads.
"""

from .format import CheckpointError, from_pretrained, save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]

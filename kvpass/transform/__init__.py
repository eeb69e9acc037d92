"""Rewriting: lowering sites to KVAttention, calibration, healing, the pass registry
(:mod:`~kvpass.transform.registry`), the per-layer driver and the passes (``passes/``).
"""

from . import passes  # noqa: F401,E402 - the pass modules register themselves in the registry

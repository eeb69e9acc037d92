"""kvpass: compiler-style passes that shrink a trained transformer's KV cache.

    >>> import kvpass
    >>> sorted(kvpass.FORMS)
    ['full', 'mhc', 'quantize', 'shared_kv', 'sparse', 'window']
"""

from . import evaluate  # a callable module: kvpass.evaluate(model, policies, tokenizer)
from .api import Report, kv_bytes_per_token, kv_cache_bytes, optimize, retarget
from .backend import register_backend
from .capture import Captured, capture
from .checkpoint import from_pretrained, save_pretrained
from .errors import CaptureError, InputError, KVPassError, PolicyError, SiteError
from .policy import FORMS, MHC, Form, Full, Policy, Quantize, SharedKV, Sparse, Window
from .sites import AttentionSite, find_sites

__version__ = "0.1.0"
__all__ = [
    "optimize", "retarget", "kv_bytes_per_token", "kv_cache_bytes", "Report",
    "capture", "Captured", "find_sites", "AttentionSite",
    "Policy", "Form", "Full", "SharedKV", "MHC", "Window", "Sparse", "Quantize", "FORMS",
    "KVPassError", "CaptureError", "SiteError", "PolicyError", "InputError", "register_backend",
    "save_pretrained", "from_pretrained", "evaluate",
]

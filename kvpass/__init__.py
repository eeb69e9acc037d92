"""kvpass: compiler-style passes that shrink a trained transformer's KV cache.

    >>> import kvpass
    >>> sorted(kvpass.FORMS)
    ['full', 'mhc', 'quantize', 'shared_kv', 'sparse', 'window']
"""

from . import _compat
from .checkpoint.format import from_pretrained, save_pretrained
from .compile.backend import register_backend
from .errors import CaptureError, InputError, KVPassError, PolicyError, SiteError
from .eval.compare import evaluate
from .graph.capture import Captured, capture
from .graph.sites import AttentionSite, find_sites
from .ir.forms import FORMS, MHC, Form, Full, Quantize, SharedKV, Sparse, Window
from .ir.policy import Policy
from .runtime.accounting import kv_bytes_per_token, kv_cache_bytes
from .search import budget as _budget  # noqa: F401 - registers Policy.budget
from .transform.driver import Report
from .transform.optimize import optimize, retarget

_compat.install()  # old module paths (kvpass.api, kvpass.lower, ...) for one release

__version__ = "0.2.0"
__all__ = [
    "optimize", "retarget", "kv_bytes_per_token", "kv_cache_bytes", "Report",
    "capture", "Captured", "find_sites", "AttentionSite",
    "Policy", "Form", "Full", "SharedKV", "MHC", "Window", "Sparse", "Quantize", "FORMS",
    "KVPassError", "CaptureError", "SiteError", "PolicyError", "InputError", "register_backend",
    "save_pretrained", "from_pretrained", "evaluate",
]

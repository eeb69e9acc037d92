"""Old module paths (the flat layout before 0.2), kept importable for one release.

``import kvpass.lower`` or ``from kvpass.api import optimize`` still work: a finder installed
by ``kvpass/__init__`` answers each old name with a small module whose attributes are looked
up, on first use, in the new modules that now hold them (``OLD_PATHS``), with a
``DeprecationWarning`` naming the new path.  Nothing inside kvpass imports these names (the
layering test checks it); they go away in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__all__ = ["OLD_PATHS", "install"]

#: old module -> the modules that now hold its names, searched in order
OLD_PATHS: dict[str, tuple[str, ...]] = {
    "kvpass.api": ("kvpass.transform.optimize", "kvpass.transform.driver", "kvpass.runtime.accounting",
                   "kvpass.runtime.hooks"),
    "kvpass.backend": ("kvpass.compile.backend",),
    "kvpass.blocks": ("kvpass.semantics.block_sparse",),
    "kvpass.budget": ("kvpass.search.budget",),
    "kvpass.cache": ("kvpass.runtime.cache", "kvpass.semantics.layout"),
    "kvpass.calibrate": ("kvpass.transform.calibrate",),
    "kvpass.capture": ("kvpass.graph.capture",),
    "kvpass.codegen": ("kvpass.kernels",),
    "kvpass.codegen.aot": ("kvpass.kernels.aot",),
    "kvpass.codegen.cpu": ("kvpass.kernels.cpu",),
    "kvpass.codegen.generate": ("kvpass.kernels.generate",),
    "kvpass.codegen.ops": ("kvpass.kernels.ops",),
    "kvpass.codegen.spec": ("kvpass.kernels.spec",),
    "kvpass.evaluate": ("kvpass.eval.long_range",),
    "kvpass.evaluate_basic": ("kvpass.eval.perplexity",),
    "kvpass.evaluation": ("kvpass.eval.compare",),
    "kvpass.graphutil": ("kvpass.graph.util",),
    "kvpass.heal": ("kvpass.transform.heal",),
    "kvpass.latent": ("kvpass.runtime.latent",),
    "kvpass.lower": ("kvpass.transform.lower", "kvpass.runtime.core", "kvpass.runtime.attention", "kvpass.ir.plan"),
    "kvpass.models": ("kvpass.assets.models",),
    "kvpass.passes": ("kvpass.transform.passes",),
    "kvpass.passes.mhc": ("kvpass.transform.passes.mhc",),
    "kvpass.passes.quantize": ("kvpass.transform.passes.quantize",),
    "kvpass.passes.shared_kv": ("kvpass.transform.passes.shared_kv",),
    "kvpass.passes.sparse": ("kvpass.transform.passes.sparse",),
    "kvpass.passes.window": ("kvpass.transform.passes.window", "kvpass.search.hybrid"),
    "kvpass.policy": ("kvpass.ir.policy", "kvpass.ir.forms"),
    "kvpass.quant": ("kvpass.semantics.qformat",),
    "kvpass.reference": ("kvpass.semantics.reference",),
    "kvpass.rewrite": ("kvpass.checkpoint.rewrite", "kvpass.checkpoint.native"),
    "kvpass.sites": ("kvpass.graph.sites",),
    "kvpass.stream": ("kvpass.checkpoint.stream",),
    "kvpass.text": ("kvpass.assets.text",),
    "kvpass.zoo": ("kvpass.eval.zoo",),
}


class _OldModule(types.ModuleType):
    """An old path: each attribute is found in the new modules (and cached here)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        for new in OLD_PATHS[self.__name__]:
            mod = importlib.import_module(new)
            if hasattr(mod, name):
                warnings.warn(f"{self.__name__}.{name} moved to {new}.{name}; the old path goes away in the "
                              "next release", DeprecationWarning, stacklevel=2)
                value = getattr(mod, name)
                setattr(self, name, value)
                return value
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it now lives in "
                             f"{' / '.join(OLD_PATHS[self.__name__])})")

    def __call__(self, *args, **kwargs):
        """``kvpass.evaluate`` and ``kvpass.capture`` are functions; importing the old module of
        the same name replaces the package attribute, so that module calls the function."""
        if self.__name__ not in _CALLABLE:
            raise TypeError(f"module {self.__name__!r} is not callable")
        mod, name = _CALLABLE[self.__name__]
        return getattr(importlib.import_module(mod), name)(*args, **kwargs)


_CALLABLE = {"kvpass.evaluate": ("kvpass.eval.compare", "evaluate"),
             "kvpass.capture": ("kvpass.graph.capture", "capture")}


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = _OldModule(spec.name, f"Old path of {', '.join(OLD_PATHS[spec.name])} (deprecated).")
        mod.__path__ = []  # a package, so that kvpass.codegen.ops and kvpass.passes.mhc resolve
        return mod

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in OLD_PATHS:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)


def install() -> None:
    """Answer the old module names (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())

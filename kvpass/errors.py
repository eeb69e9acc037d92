"""kvpass's exceptions: each one says what did not match and where."""

from __future__ import annotations


class KVPassError(Exception):
    """Base class of every error kvpass raises on purpose."""


class CaptureError(KVPassError):
    """The model (or one module of it) could not be traced into a graph."""


class SiteError(KVPassError):
    """An attention site does not fit what a pass or the lowering needs.

    The message names the owning module and the node/op that did not match.
    """


class PolicyError(KVPassError, ValueError):
    """A policy, form or policy file is invalid: names the field, the value and what is allowed."""


class InputError(KVPassError, ValueError):
    """An input that is not there or not what it claims to be (a text file, a path)."""

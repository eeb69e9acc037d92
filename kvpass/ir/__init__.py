"""The IR: forms, policies and per-layer plans -- plain data, no torch.fx and no Hugging Face.

Stage 2 of kvpass's import order (see ``docs/architecture.md``): it imports only ``errors``,
``util`` and ``semantics``.
"""

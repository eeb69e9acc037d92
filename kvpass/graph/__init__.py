"""Capture and discovery on graphs: ``torch.export`` capture, FX helpers, attention-core matching
and site description (projections, heads, RoPE, masks, windows), by meaning only.
"""

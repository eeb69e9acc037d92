"""Searches over policies: the per-layer KV budget and hybrid window layouts."""

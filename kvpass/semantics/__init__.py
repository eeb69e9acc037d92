"""The meaning of every attention form: the plain-torch reference, visibility rules over token
positions, block-sparse tables, cache layouts and KV quantization formats.  Everything else
(kernels, runtime, rewrites) is tested against this package.
"""

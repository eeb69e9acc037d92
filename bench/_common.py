"""Shared set-up of the quality benches: calibration/evaluation arguments, model, scorer."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kvpass.assets import models
from kvpass.assets.text import load_text, token_chunks
from kvpass.eval.perplexity import quality_scorer


def add_quality_args(ap: argparse.ArgumentParser, eval_len: int) -> None:
    """--calib-chunks/--calib-len (Persuasion), --eval-chunks/--eval-len (Emma), healing, --json."""
    ap.add_argument("--calib-chunks", type=int, default=16)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=eval_len)
    ap.add_argument("--heal-steps", type=int, default=None)
    ap.add_argument("--heal-lr", type=float, default=2e-3)
    ap.add_argument("--json", type=Path, default=None)


def load_for_quality(args):
    """(model, tokenizer, calibration ids, score name, score function) for ``args.model``."""
    torch.manual_seed(0)
    model, tok = models.load(args.model)
    calib = token_chunks(tok, load_text("calibration"), args.calib_len, args.calib_chunks)
    score_name, score = quality_scorer(model, tok, load_text("eval"), args.eval_len, args.eval_chunks)
    return model, tok, calib, score_name, score

"""``kvpass.evaluate(model, policies, tokenizer)``: quality, memory and speed side by side.

For the original model and each policy, on the same tokens:

- **quality**: causal LMs get perplexity over ``chunks`` × ``context`` tokens of held-out text,
  long-range perplexity (targets at positions ``>= late``) from the same forward, and passkey
  accuracy (counted where the original succeeds); encoders get the mean cosine of sentence
  embeddings to the original's;
- **KV bytes per token** at ``context``: computed from the layers' layouts
  (:func:`kvpass.kv_cache_bytes`) and *measured* from the cache tensors after a prefill;
- **peak cache memory and decode tokens/s** at each of ``speed_contexts``: the cache is filled
  by a chunked prefill of real text, then ``decode_steps`` greedy tokens are timed.

The result prints as one table (:meth:`Evaluation.table`), saves as JSON and plots perplexity
against KV bytes per token with the Pareto front marked (:meth:`Evaluation.plot`).

Example (a tiny random model, so the numbers mean nothing; real runs: ``kvpass eval``):
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> torch.manual_seed(0) and None
    >>> ids = torch.randint(0, 64, (2, 48))
    >>> ev = kvpass.evaluate(LlamaForCausalLM(cfg).eval(), {"int8": kvpass.Quantize(bits=8, group=8)},
    ...                      tokens=ids, context=24, speed_contexts=(32,), decode_steps=2, progress=False)
    >>> [r["label"] for r in ev.rows], ev.rows[1]["kv_bytes_per_token"] < ev.rows[0]["kv_bytes_per_token"]
    (['original', 'int8'], True)
    >>> ev.rows[1]["kv_bytes_per_token"] == ev.rows[1]["kv_bytes_per_token_measured"]
    True
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..assets.text import load_text, split_sentences, token_chunks
from ..ir.forms import Full, label_items
from ..ir.policy import Policy
from ..runtime.accounting import kv_cache_bytes
from ..runtime.cache import cache_nbytes
from ..transform.optimize import optimize, retarget
from ..transform.registry import visibility_only
from ..util import is_causal_lm
from .long_range import passkey_accuracy, passkey_retained, perplexity_by_position
from .perplexity import embedding_cosine

__all__ = ["evaluate", "Evaluation", "decode_speed", "measured_bytes", "pareto_front"]


@dataclass
class Evaluation:
    """Rows (dicts, the original first) and the settings they were measured with."""

    rows: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def bytes_dtype(self) -> str:
        """The cache dtype the table's and the plot's bytes and ratios are counted in (one for
        all rows: ``settings["bytes_dtype"]``, default the dtype the model ran in)."""
        return self.settings.get("bytes_dtype") or "float32"

    def kv_bytes(self, row: dict) -> float:
        """KV bytes per token of ``row`` in :attr:`bytes_dtype`."""
        return row["kv_bytes_per_token_bf16" if self.bytes_dtype in _HALF else "kv_bytes_per_token"]

    def ratio(self, row: dict) -> float:
        """``row``'s cache over the original's, both in :attr:`bytes_dtype`."""
        return self.kv_bytes(row) / self.kv_bytes(self.rows[0])

    def table(self) -> str:
        """One text table: quality, its change, KV bytes/token and cache ratio (both in
        :attr:`bytes_dtype`, named in the header), speed columns."""
        base = self.rows[0]
        quality = "perplexity" if "perplexity" in base else "cosine"
        speeds = [str(n) for n in self.settings.get("speed_contexts", ())]
        dt = _SHORT.get(self.bytes_dtype, self.bytes_dtype)
        head = (f"{'policy':<36} {quality:>10} {'change':>8} {'late ppl':>9} {'passkey':>8} "
                f"{'KV B/tok ' + dt:>13} {'cache':>7}" + "".join(f" {'tok/s@' + n:>11} {'peak MB@' + n:>11}"
                                                             for n in speeds))
        lines = [head, "-" * len(head)]
        for r in self.rows:
            q = r.get(quality)
            change = "" if r is base or q is None else f"{(q / base[quality] - 1) * 100:+.2f}%"
            late = r.get("late_perplexity")
            pk = r.get("passkey_retained", r.get("passkey", {}).get("accuracy") if r.get("passkey") else None)
            cells = [f"{r['label'][:36]:<36}", f"{q:>10.3f}" if q is not None else f"{'-':>10}", f"{change:>8}",
                     f"{late:>9.3f}" if late is not None else f"{'-':>9}",
                     f"{pk:>8.2f}" if pk is not None else f"{'-':>8}",
                     f"{self.kv_bytes(r):>13,.0f}", f"{self.ratio(r):>6.3f}x"]
            for n in speeds:
                s = r.get("speed", {}).get(n)
                cells += [f"{s['tokens_per_s']:>11.2f}", f"{s['peak_cache_bytes'] / 1e6:>11.2f}"] if s else \
                         [f"{'-':>11}", f"{'-':>11}"]
            lines.append(" ".join(cells))
        return "\n".join(lines)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"settings": self.settings, "rows": self.rows}, indent=1)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def plot(self, path: str | Path) -> str:
        """Quality vs KV bytes per token, one point per policy, the Pareto front joined."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        quality = "perplexity" if "perplexity" in self.rows[0] else "cosine"
        pts = [(self.kv_bytes(r), r[quality], r["label"]) for r in self.rows]
        front = pareto_front([(x, y) for x, y, _ in pts], lower_is_better=quality == "perplexity")
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for i, (x, y, label) in enumerate(pts):
            on = i in front
            ax.scatter(x, y, s=40 if on else 18, c="tab:red" if on else "tab:blue", zorder=3)
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        fx = sorted((pts[i][0], pts[i][1]) for i in front)
        ax.plot([p[0] for p in fx], [p[1] for p in fx], "r--", lw=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(f"KV cache bytes per token at {self.settings.get('kv_context')} tokens "
                      f"({self.bytes_dtype} cache)")
        ax.set_ylabel(quality + (" (held-out text)" if quality == "perplexity" else " to the original"))
        ax.set_title(self.settings.get("model", "kvpass eval"))
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
        plt.close(fig)
        return str(path)


_HALF = ("bfloat16", "float16")
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats on both cost (x, lower better) and quality.

    >>> pareto_front([(1, 5.0), (2, 4.0), (3, 4.5), (4, 3.0)])
    [0, 1, 3]
    """
    sign = 1 if lower_is_better else -1
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and sign * y2 <= sign * y) and (x2 < x or sign * y2 < sign * y)
                        for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            out.append(i)
    return out


@torch.inference_mode()
def measured_bytes(model: nn.Module, ids: torch.Tensor, chunk: int = 1024) -> tuple[int, float]:
    """(cache bytes after a chunked prefill of ``ids`` [1, N], seconds): read from the cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "config", None))
    t = time.perf_counter()
    for start in range(0, ids.shape[1], chunk):
        model(ids[:, start:start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    return cache_nbytes(cache), time.perf_counter() - t


@torch.inference_mode()
def decode_speed(model: nn.Module, ids: torch.Tensor, steps: int = 16, chunk: int = 1024) -> dict:
    """Fill a cache with ``ids`` [1, N] (chunked prefill), then time ``steps`` greedy decode
    steps.  -> {tokens_per_s, peak_cache_bytes, prefill_s}; the peak is read from the cache
    tensors after every step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "config", None))
    t = time.perf_counter()
    out = None
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start:start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t
    peak = after_prefill = cache_nbytes(cache)
    nxt = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        peak = max(peak, cache_nbytes(cache))
    return {"tokens_per_s": steps / (time.perf_counter() - t), "peak_cache_bytes": peak,
            "prefill_cache_bytes": after_prefill, "prefill_s": round(prefill, 2)}


def _label(policy) -> str:
    p = Policy.of(policy)
    if not p.layers:
        return "+".join(f.kind + "(" + ",".join(f"{k}={v}" for k, v in label_items(f)) + ")"
                        for f in p.default)
    return f"policy ({len(p.layers)} overrides)"


def evaluate(
    model: nn.Module,
    policies: Mapping[str, object] | Sequence[object],
    tokenizer=None,
    *,
    text: str | None = None,
    tokens: torch.Tensor | None = None,
    context: int = 2048,
    chunks: int = 4,
    kv_context: int | None = None,
    late: int | None = None,
    passkey_lengths: Sequence[int] | None = None,
    passkey_depths: Sequence[float] = (0.1, 0.5, 0.9),
    speed_contexts: Sequence[int] = (512, 2048, 8192),
    decode_steps: int = 16,
    calibration=None,
    bytes_dtype: str | None = None,
    progress: bool = True,
    on_row=None,
) -> Evaluation:
    """Measure the original ``model`` and each policy on the same tokens (module docstring).

    Args:
        policies: ``{label: policy}`` or a list (labelled from the forms); a policy is anything
            :func:`kvpass.optimize` takes.  Policies of visibility forms only share one traced
            copy (``retarget``); others are optimised from the original each.
        tokenizer, text: held-out text (default: the bundled evaluation text, *Emma*); or
            ``tokens`` [N, S] ids directly (then no passkey and no tokenizer needed).
        context: chunk length for perplexity and (unless ``kv_context``) the context KV bytes
            are reported at; ``late`` (default ``context // 2``) starts the long-range targets.
        passkey_lengths: prompt lengths (default ``[context // 2, context]``; causal LMs with a
            tokenizer only); counted only where the original retrieves the key.
        speed_contexts: contexts for peak cache memory and decode tokens/s (``()`` to skip).
        calibration: text or ids for policies that calibrate (passed to ``optimize``).
        bytes_dtype: the cache dtype the table and the plot count bytes in (``"bfloat16"``,
            ``"float16"`` or ``"float32"``; default: the model's dtype).  Both are stored per
            row (``kv_bytes_per_token``: as run; ``kv_bytes_per_token_bf16``).
        on_row: called with the :class:`Evaluation` after each row (partial results).
    """
    if not isinstance(policies, Mapping):
        policies = {_label(p): p for p in policies}
    causal = is_causal_lm(model)
    late = context // 2 if late is None else late
    if tokens is None:
        if tokenizer is None:
            raise ValueError("evaluate: give a tokenizer (with text=, or the bundled text) or tokens=")
        body = text if text is not None else load_text("eval")
        tokens = token_chunks(tokenizer, body, context, chunks) if causal else None
    else:
        tokens = tokens[:chunks, :context]
    sentences = None if causal else split_sentences(text if text is not None else load_text("eval"), 256)
    kv_context = kv_context or context
    need = max([kv_context, *speed_contexts]) + decode_steps + 1
    stream = tokens.flatten()[None] if tokens is not None else None
    if stream is not None and stream.shape[1] < need and tokenizer is not None:
        stream = token_chunks(tokenizer, text if text is not None else load_text("eval"), need, 1)
    lengths = list(passkey_lengths) if passkey_lengths is not None else [max(64, context // 2), context]
    do_passkey = causal and tokenizer is not None and bool(lengths)
    settings = {"model": getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__,
                "context": context, "kv_context": kv_context, "late": late,
                "chunks": int(tokens.shape[0]) if tokens is not None else None,
                "passkey_lengths": lengths if do_passkey else [], "passkey_depths": list(passkey_depths),
                "speed_contexts": [n for n in speed_contexts if stream is not None and stream.shape[1] >= n],
                "decode_steps": decode_steps,
                "bytes_dtype": bytes_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")}
    if settings["bytes_dtype"] not in (*_HALF, "float32"):
        raise ValueError(f"evaluate: bytes_dtype {bytes_dtype!r}: one of bfloat16, float16, float32")
    result = Evaluation(settings=settings)
    base_pk = None
    lowered = None
    items = [("original", None), *policies.items()]
    bar = tqdm(items, desc="kvpass eval", disable=not progress)
    for label, policy in bar:
        bar.set_postfix_str(label[:40])
        t0 = time.time()
        if policy is None:
            fast = model
        elif policy_visibility_only(policy):
            if lowered is None:
                lowered = optimize(model, Full())
            fast = retarget(lowered, policy)
        else:
            kw = {"calibration": calibration, "tokenizer": tokenizer} if calibration is not None else {}
            fast = optimize(model, policy, **kw)
        row: dict = {"label": label}
        if policy is not None:
            row["policy"] = Policy.of(policy).to_dict()
        with torch.inference_mode():
            if causal:
                by_pos = perplexity_by_position(fast, tokens, bucket=math.gcd(late, context) or context,
                                                progress=False)
                row.update(_perplexities(by_pos, context, late))
            else:
                row["cosine"] = embedding_cosine(model, fast, tokenizer, sentences, progress=False)
        if do_passkey:
            pk = passkey_accuracy(fast, tokenizer, lengths, passkey_depths, progress=False)
            row["passkey"] = pk
            if base_pk is None:
                base_pk = pk
            else:
                row["passkey_retained"] = passkey_retained(base_pk, pk)["retained"]
        n = kv_context
        row["kv_bytes_per_token"] = kv_cache_bytes(fast, n) / n
        row["kv_bytes_per_token_bf16"] = kv_cache_bytes(fast, n, dtype=torch.bfloat16) / n
        if causal and stream is not None:
            row["speed"] = {str(c): decode_speed(fast, stream[:, :c], decode_steps)
                            for c in settings["speed_contexts"]}
            got = row["speed"][str(n)]["prefill_cache_bytes"] if str(n) in row["speed"] else \
                measured_bytes(fast, stream[:, :n])[0]
            row["kv_bytes_per_token_measured"] = got / n
        row["seconds"] = round(time.time() - t0, 1)
        base = result.rows[0] if result.rows else row
        row["cache_ratio"] = row["kv_bytes_per_token"] / base["kv_bytes_per_token"]
        row["cache_ratio_bf16"] = row["kv_bytes_per_token_bf16"] / base["kv_bytes_per_token_bf16"]
        result.rows.append(row)
        if on_row is not None:
            on_row(result)
    return result


def policy_visibility_only(policy) -> bool:
    p = Policy.of(policy)
    forms = list(p.default) + [f for v in p.layers.values() for f in v]
    return visibility_only(forms)


def _perplexities(by_pos: list[tuple[int, float]], seq: int, late: int) -> dict:
    """Overall and late (positions >= late) perplexity from per-bucket perplexities."""
    counts = [min(start + (by_pos[1][0] - by_pos[0][0] if len(by_pos) > 1 else seq), seq) - max(start, 1)
              for start, _ in by_pos]
    nll = [math.log(p) for _, p in by_pos]
    total = sum(c * v for c, v in zip(counts, nll)) / sum(counts)
    far = [(c, v) for c, v, (start, _) in zip(counts, nll, by_pos) if start >= late]
    out = {"perplexity": math.exp(total)}
    if far:
        out["late_perplexity"] = math.exp(sum(c * v for c, v in far) / sum(c for c, _ in far))
    return out

"""A per-layer policy for a KV-memory budget: ``kvpass.Policy.budget(model, kv_ratio=4, ...)``.

The search chooses, for every attention layer, one option among full attention, quantized
storage (int8 / int4 / int2), windows with sinks and windows of quantized storage (the forms
that change no weights, so every candidate is a cheap ``retarget`` of one traced copy), so
that the cache at ``context`` tokens is at most ``1 / kv_ratio`` of the original's with the
least estimated damage:

1. **Local error.**  One forward of a calibration chunk of ``context`` tokens records every
   layer's queries, keys and values.  For each layer and option, the layer's attention output
   for the last ``queries`` positions is recomputed under the option (windowed visibility,
   keys/values quantized by :mod:`kvpass.semantics.qformat`) and compared with the full output:
   ``err = |o' - o|² / |o|²``.  Far-reaching layers show a large error for windows; layers
   with outlier channels, for quantization.  With a tokenizer, a second forward runs a
   retrieval prompt of ``context`` tokens (a pass key hidden at 20% depth in the calibration
   text, asked for at the end) and the error of the answer positions is added: layers that
   retrieve far back then refuse windows even where ordinary text barely needs them.
2. **Sensitivity.**  How much a layer's error moves the model: on a shorter probe, one
   reference option (int2, per-token) is put on that layer alone and the model's next-token KL
   from the original is measured; ``sensitivity = KL / err`` of that option on the probe.
3. **Choice.**  ``damage = sensitivity × err``; a knapsack (dynamic programme over the cache
   bytes, rounded up so the budget is never exceeded) picks one option per layer minimising
   the summed damage.  Cache bytes are the layers' exact layouts at ``context`` tokens
   (:meth:`kvpass.runtime.core.KVCore.cache_bytes`, equal to what the cache tensors hold), in
   ``dtype`` (default: the model's).

The returned :class:`kvpass.Policy` carries ``policy.explanation`` (a :class:`BudgetSearch`)
whose :meth:`~BudgetSearch.table` explains each layer's choice.

Example (a tiny random model; real runs: ``kvpass eval MODEL --budget 4``):
    >>> import torch, kvpass
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=64, num_hidden_layers=3,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> torch.manual_seed(0) and None
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> ids = torch.randint(0, 64, (1, 512))
    >>> pol = kvpass.Policy.budget(model, kv_ratio=4, context=512, calibration=ids, progress=False)
    >>> search = pol.explanation
    >>> search.bytes <= search.budget, len(search.rows)
    (True, 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..assets.text import load_text, token_chunks
from ..errors import KVPassError, PolicyError
from ..eval.long_range import passkey_prompt
from ..ir.forms import Form, Full, Quantize, Window
from ..ir.policy import Policy, register_search
from ..runtime.accounting import kv_cache_bytes, vllm_request_bytes
from ..runtime.attention import KVAttention
from ..semantics import reference
from ..semantics.qformat import fake_quantize
from ..transform.optimize import optimize, retarget
from ..transform.passes.quantize import rule as quant_rule
from ..transform.passes.window import sink_logits_for
from ..util import kl_divergence, knapsack

__all__ = ["budget_policy", "BudgetSearch", "candidates"]


def candidates(context: int, kinds=("quantize", "window"), target: str = "kvpass") -> dict[str, tuple[Form, ...]]:
    """The per-layer options searched at ``context`` tokens, by label.

    ``target="vllm"``: only what vLLM serves -- full attention and windows, all with an fp8
    cache when ``"quantize"`` is among ``kinds`` (vLLM stores one KV dtype for the whole model,
    so fp8 is all or nothing); windows with sink logits (``Window(W, 4, sink="logit")``) without
    fp8 (vLLM's CPU attention runs sinks with an fp8 cache differently), plain windows with it.

    >>> sorted(candidates(4096, target="vllm"))
    ['fp8', 'window 1024 + fp8', 'window 2048 + fp8', 'window 256 + fp8', 'window 512 + fp8']
    >>> candidates(4096, ("window",), target="vllm")["window 512"]
    (Window(size=512, sinks=4, sink='logit'),)
    """
    if target == "vllm":
        return _vllm_candidates(context, kinds)
    out: dict[str, tuple[Form, ...]] = {"full": (Full(),)}
    quants = {"int8": Quantize(bits=8, group=64), "int4": Quantize(bits=4, group=64),
              "int4 g32": Quantize(bits=4, group=32), "int2 g32": Quantize(bits=2, group=32)}
    if "quantize" in kinds:
        out.update({k: (q,) for k, q in quants.items()})
    if "window" in kinds:
        for w in (context // 16, context // 8, context // 4, context // 2):
            if w < 64:
                continue
            out[f"window {w}"] = (Window(w, sinks=4),)
            if "quantize" in kinds:
                for k in ("int8", "int4"):
                    out[f"window {w} + {k}"] = (Window(w, sinks=4), quants[k])
    unknown = set(kinds) - {"quantize", "window"}
    if unknown:
        raise PolicyError(f"Policy.budget: forms {sorted(unknown)} are not searched; allowed: quantize, window "
                          "(forms that change no weights; give MHC/SharedKV policies to optimize directly)")
    return out


def _vllm_candidates(context: int, kinds) -> dict[str, tuple[Form, ...]]:
    unknown = set(kinds) - {"quantize", "window"}
    if unknown:
        raise PolicyError(f"Policy.budget(target='vllm'): forms {sorted(unknown)} are not searched; allowed: "
                          "quantize (fp8 everywhere), window (sink logits)")
    fp8 = (Quantize(format="fp8"),) if "quantize" in kinds else ()
    tag = " + fp8" if fp8 else ""
    out: dict[str, tuple[Form, ...]] = {"fp8" if fp8 else "full": fp8 or (Full(),)}
    if "window" in kinds:
        for w in (context // 16, context // 8, context // 4, context // 2):
            if w >= 64:
                out[f"window {w}{tag}"] = (Window(w, sinks=0), *fp8) if fp8 else (Window(w, sinks=4, sink="logit"),)
    return out


@dataclass
class BudgetSearch:
    """What the search measured and chose (see the module docstring)."""

    budget: int
    original: int
    bytes: int
    context: int
    rows: list[dict] = field(default_factory=list)  # per layer: chosen, bytes, err, sensitivity, options

    def table(self) -> str:
        head = (f"{'layer':>5}  {'chosen':<22} {'bytes @ctx':>12} {'share':>6} {'sensitivity':>11} "
                f"{'damage':>9}  runner-up")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            alt = r.get("runner_up")
            alt_s = f"{alt[0]} ({alt[1]:.2e})" if alt else "-"
            share = r["bytes"] / self.original * len(self.rows)  # of the layer's original cache
            lines.append(f"{r['layer']:>5}  {r['chosen']:<22} {r['bytes']:>12,} {share:>6.3f} "
                         f"{r['sensitivity']:>11.3g} {r['damage']:>9.2e}  {alt_s}")
        lines.append("-" * len(head))
        lines.append(f"cache at {self.context} tokens: {self.bytes:,} B of a {self.budget:,} B budget "
                     f"(original {self.original:,} B: {self.original / self.bytes:.2f}x smaller)")
        return "\n".join(lines)


def _taps(cores, last: int):
    store = {}

    def tap_for(core):
        def tap(q, k, v):
            if k is None:
                return
            store[core.layer_idx] = (q[:, :, -last:].detach(), k.detach(), v.detach())
        return tap

    for c in cores:
        c.taps.append(tap_for(c))
    return store


def _untap(cores):
    for c in cores:
        c.taps.pop()


def _logits_for(core, q, k, v, f: Window, fitted: dict | None) -> torch.Tensor:
    """Sink logits of a ``Window(sink="logit")`` option on this layer: fitted on this batch's
    queries (the last ones of the long chunk), or the ones fitted there before (``fitted``)."""
    key = (core.layer_idx, f.size, f.sinks)
    if fitted is not None and key in fitted:
        return fitted[key]
    hm = torch.tensor(core.spec.kv_head_map, device=k.device)
    sigma = sink_logits_for(q, k.index_select(1, hm), v.index_select(1, hm), scale=core.spec.scale,
                            softcap=core.spec.softcap, size=f.size, sinks=f.sinks, q_offset=k.shape[2] - q.shape[2])
    if fitted is not None:
        fitted[key] = sigma
    return sigma


def _layer_errors(core, q, k, v, options: dict[str, tuple[Form, ...]], fitted: dict | None = None
                  ) -> dict[str, float]:
    """Relative error of the layer's attention output (last queries) under each option.

    Quantized options attend over the quantized keys/values everywhere (the flush rule's
    full-precision residual is ignored: a slight over-estimate), so every option runs through
    torch's fused SDPA; the full output and each quantization's values are computed once."""
    s = core.spec
    B, _, S, _ = k.shape
    pos = torch.arange(S, device=k.device)[None].expand(B, S)
    base = dict(kv_head_map=s.kv_head_map, scale=s.scale, causal=s.causal, softcap=s.softcap,
                q_pos=pos[:, S - q.shape[2]:], k_pos=pos)
    ref = reference.attention_sdpa(q, k, v, **base).float()
    norm = (ref ** 2).sum().clamp(min=1e-30)
    hats: dict = {}
    out = {}
    for label, forms in options.items():
        kw, kk, vv = dict(base), k, v
        for f in forms:
            if f.kind == "window" and f.sink == "logit":
                kw.update(window=f.size, sinks=0, sink_logits=_logits_for(core, q, k, v, f, fitted).to(q.dtype))
            elif f.kind == "window":
                kw.update(window=f.size, sinks=f.sinks)
            elif f.kind == "quantize" and f.format == "fp8":
                kk = kk.clamp(-448, 448).to(torch.float8_e4m3fn).to(k.dtype)
                vv = vv.clamp(-448, 448).to(torch.float8_e4m3fn).to(v.dtype)
            elif f.kind == "quantize":
                if f not in hats:
                    r = quant_rule(f)
                    hats[f] = (fake_quantize(k, pos, r.bits, r.group, r.keys)[0],
                               fake_quantize(v, pos, r.bits, r.group, r.values)[0])
                kk, vv = hats[f]
        if len(kw) == len(base) and kk is k:
            out[label] = 0.0
            continue
        o = reference.attention_sdpa(q, kk, vv, **kw).float()
        out[label] = float(((o - ref) ** 2).sum() / norm)
    return out


def _retrieval_ids(tokenizer, text: str, context: int):
    """(ids [1, context] of a pass-key prompt + its answer, number of answer positions): the key
    at 20% depth in ``text`` (calibration text, never the evaluation's filler)."""
    try:
        prompt, answer = passkey_prompt(tokenizer, context - 8, 0.2, 73_919, filler=text[:400_000])
    except ValueError:  # context too short for a prompt
        return None
    ids = torch.cat([prompt[0], answer])[None]
    return ids, answer.numel() + 1


def budget_policy(model: nn.Module, kv_ratio: float, context: int = 4096, forms=("quantize", "window"),
                  calibration=None, tokenizer=None, dtype: torch.dtype | None = None, queries: int = 128,
                  probe: int = 256, progress: bool = True, target: str = "kvpass",
                  max_num_batched_tokens: int = 512) -> Policy:
    """The per-layer policy for ``1 / kv_ratio`` of the cache at ``context`` tokens (module
    docstring).  ``calibration``: text (with ``tokenizer``) or token ids [N, S]; default the
    bundled calibration text (*Persuasion*), never the evaluation text.

    ``target="vllm"``: only options vLLM serves (:func:`candidates`), costed as vLLM holds them
    for one request of ``context`` tokens (:func:`kvpass.runtime.accounting.vllm_request_bytes`:
    a window layer keeps its window plus ``max_num_batched_tokens``, in whole blocks); the
    policy then rewrites with ``kvpass rewrite --target vllm`` (its logit sinks calibrate)."""
    if target not in ("kvpass", "vllm"):
        raise PolicyError(f"Policy.budget: target: invalid value {target!r}; allowed: 'kvpass', 'vllm'")
    if not kv_ratio > 1:
        raise PolicyError(f"Policy.budget: kv_ratio={kv_ratio!r} must be > 1 (the cache shrinks by this factor)")
    if calibration is None or isinstance(calibration, str):
        if tokenizer is None:
            raise PolicyError("Policy.budget: calibration text needs tokenizer= (or give token ids)")
        text = load_text("calibration") if calibration is None else calibration
        long_ids = token_chunks(tokenizer, text, context, 1)
        probe_ids = token_chunks(tokenizer, text, min(probe, context), 1)
        retrieval = _retrieval_ids(tokenizer, text, context)
    else:
        ids = torch.as_tensor(calibration)
        if ids.shape[1] < context:
            raise PolicyError(f"Policy.budget: calibration ids have {ids.shape[1]} tokens per row, "
                              f"context={context} needs that many")
        long_ids, probe_ids = ids[:1, :context], ids[:1, :min(probe, context)]
        retrieval = None
    options = candidates(context, forms, target)
    dtype = dtype or next(model.parameters()).dtype
    lowered = optimize(model, Full())
    atts = [m for m in lowered.modules() if isinstance(m, KVAttention)]
    cores = [a.kv_core for a in atts]
    causal = [c for c in cores if c.spec.causal]
    if not causal:
        raise KVPassError("Policy.budget: the model has no causal attention (no KV cache to budget)")
    cost: dict[str, dict[int, int]] = {}
    if target == "vllm":  # as vLLM holds one request of `context` tokens
        elem = torch.empty((), dtype=dtype).element_size()

        def served(c, fs):
            w = next((f.size for f in fs if f.kind == "window"), None)
            fp8 = any(f.kind == "quantize" for f in fs)
            rec = {"kv_heads": c.stored_heads(), "window": w, "kv_cache_dtype": "fp8" if fp8 else "auto"}
            return vllm_request_bytes([rec], c.spec.head_dim, context, max_num_batched_tokens, elem)

        original = sum(served(c, (Full(),)) for c in cores)
        cost = {label: {c.layer_idx: served(c, fs) for c in cores} for label, fs in options.items()}
    else:
        original = kv_cache_bytes(lowered, context, dtype=dtype)
        # cache bytes of each option on each layer (exact layouts); options a layer refuses drop out
        for label, fs in options.items():
            try:
                retarget(lowered, Policy(default=fs))
            except KVPassError:
                continue
            cost[label] = {c.layer_idx: c.cache_bytes(context, dtype) for c in cores}
        retarget(lowered, Full())
    budget = int(original / kv_ratio)
    fitted: dict = {}  # sink logits of logit-window options, fitted on the long chunk, reused
    labels = list(cost)
    steps = len(causal) + 2
    bar = tqdm(total=steps, desc="kvpass: budget search", disable=not progress)
    with torch.inference_mode():
        store = _taps(cores, queries)
        try:
            lowered(long_ids)
        finally:
            _untap(cores)
        bar.update()
        err = {c.layer_idx: _layer_errors(c, *store[c.layer_idx], {lb: options[lb] for lb in labels}, fitted)
               for c in causal}
        del store
        if retrieval is not None:  # the answer positions of a pass-key prompt: far retrieval
            rids, answer = retrieval
            store = _taps(cores, answer)
            try:
                lowered(rids)
            finally:
                _untap(cores)
            for c in causal:
                far = _layer_errors(c, *store[c.layer_idx], {lb: options[lb] for lb in labels}, fitted)
                err[c.layer_idx] = {lb: err[c.layer_idx][lb] + far[lb] for lb in labels}
            del store
        pstore = _taps(cores, min(queries, probe_ids.shape[1]))
        try:
            clean = lowered(probe_ids).logits
        finally:
            _untap(cores)
        bar.update()
        sens = {}
        for c in causal:
            ref_form = (Quantize(bits=2, group=math.gcd(32, c.spec.head_dim), keys="per_token"),)
            e = _layer_errors(c, *pstore[c.layer_idx], {"ref": ref_form})["ref"]
            retarget(lowered, Policy(default=Full(), layers={c.layer_idx: ref_form}))
            kl = kl_divergence(clean, lowered(probe_ids).logits)
            sens[c.layer_idx] = kl / max(e, 1e-12)
            bar.update()
        retarget(lowered, Full())
    bar.close()
    layers = [c.layer_idx for c in cores]
    costs = [[cost[lb][i] for lb in labels] for i in layers]
    dmg = [[sens[i] * err[i][lb] if i in sens else 0.0 for lb in labels] for i in layers]
    # costs rounded up to units of budget/4000, so the rounded plan never exceeds the budget
    picks = knapsack(costs, dmg, budget, unit=max(1, math.ceil(budget / 4000)))
    if picks is None:
        raise PolicyError("Policy.budget: even the smallest option of every layer exceeds the budget; "
                          "lower kv_ratio or allow more forms")
    rows, chosen = [], {}
    for i, j, cs, ds in zip(layers, picks, costs, dmg):
        order = sorted(range(len(labels)), key=lambda k: ds[k])
        runner = next(((labels[k], ds[k]) for k in order if k != j and cs[k] <= cs[j]), None)
        rows.append({"layer": i, "chosen": labels[j], "bytes": cs[j], "damage": ds[j],
                     "sensitivity": sens.get(i, 0.0), "errors": {lb: err.get(i, {}).get(lb) for lb in labels},
                     "runner_up": runner})
        chosen[i] = options[labels[j]]
    policy = Policy(default=Full(), layers={i: fs for i, fs in chosen.items() if fs != (Full(),)})
    search = BudgetSearch(budget=budget, original=original, bytes=sum(r["bytes"] for r in rows),
                          context=context, rows=rows)
    object.__setattr__(policy, "explanation", search)  # not a field: equality and to_dict ignore it
    return policy


register_search("budget", budget_policy)

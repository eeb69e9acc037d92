"""The automatic zoo: every transformers text architecture, built tiny, run through kvpass.

No hand-picked list: the families are transformers' own registries —
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (decoders) and the model types that also have a masked-LM
head (``MODEL_FOR_MASKED_LM_MAPPING_NAMES``: text encoders, built as their base model from
``MODEL_MAPPING_NAMES``).  Each is built from its *default* config, shrunk by meaning (hidden
64, 2 layers, 4 heads / 2 KV heads, small vocabulary and MoE sizes: every config field whose
name says it is one of these; see :func:`shrink_config`), random weights, fp32, eval mode.

For each family :func:`check_family` measures:

* **attention cores at run time**, independently of kvpass: the SDPA kernels and the softmaxes
  over ``[.., S, >= S]`` scores a forward dispatches (a ``TorchDispatchMode`` counter);
* the **sites** kvpass finds in the traced graph, and which of them have ``problems``;
* **identity**: ``optimize(model, Full())`` against the original (max abs difference of the
  first float output, tolerance 1e-4);
* **forms**: ``Window`` (``Sparse`` for bidirectional models), ``Quantize`` and ``SharedKV``,
  each *applied* (every site's plan changed and the measured cache bytes shrank), *refused*
  with a :class:`~kvpass.KVPassError` (its message kept), a silent **no-op** (returned, but
  nothing changed: a bug), or a **crash** (any other exception: a bug).

Classes: ``EXACT`` (every core found and understood, identity within tolerance, every form
applied or refused with a clear error — none crashed or silently did nothing; a row whose
projections are not all traced, so that ``SharedKV``/``MHC`` refuse, says so in ``weights``),
``PARTIAL`` (found, with the first problem named),
``NOT_FOUND`` (cores run but kvpass found none), ``CRASH`` (a non-kvpass exception from kvpass,
or a no-op), ``UNBUILDABLE`` (the tiny model cannot be built or run by transformers itself),
``NO_ATTENTION`` (the architecture runs no softmax attention: Mamba, RWKV, ...), ``SKIPPED``
(multimodal or needs remote code: out of scope).

Example:
    >>> from kvpass.eval import zoo
    >>> row = zoo.check_family("llama")
    >>> row["class"], row["sites"], row["cores"]
    ('EXACT', 2, 2)

    $ kvpass zoo --json bench/results/zoo.json     # every family, 2 worker processes
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import KVPassError
from ..graph.capture import default_example_inputs, run_cache_free
from ..ir.forms import Full, Quantize, SharedKV, Sparse, Window
from ..runtime.accounting import kv_bytes_per_token, kv_cache_bytes
from ..runtime.attention import KVAttention
from ..transform.optimize import optimize, retarget

__all__ = ["families", "shrink_config", "build", "count_cores", "check_family", "run", "summary",
           "markdown_table", "CLASSES"]

CLASSES = ("EXACT", "PARTIAL", "NOT_FOUND", "CRASH", "UNBUILDABLE", "NO_ATTENTION", "SKIPPED")
IDENTITY_TOL = 1e-4
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN = 64, 2, 4, 2, 16, 256, 128

# ---------------------------------------------------------------------------- the families


def families() -> list[tuple[str, str]]:
    """``(model_type, kind)`` for every decoder (``"causal"``) and text encoder (``"encoder"``)
    transformers registers, sorted by name."""
    from transformers.models.auto import modeling_auto as ma

    causal = set(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    encoders = (set(ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES) & set(ma.MODEL_MAPPING_NAMES)) - causal
    return sorted([(t, "causal") for t in causal] + [(t, "encoder") for t in encoders])


def _class_for(model_type: str, kind: str):
    import transformers
    from transformers.models.auto import modeling_auto as ma

    table = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if kind == "causal" else ma.MODEL_MAPPING_NAMES
    name = table[model_type]
    if isinstance(name, (tuple, list)):
        name = name[0]
    return getattr(transformers, name)


# Config fields by meaning (substring of the field name -> size).  Order matters: the first
# rule whose pattern is in the name wins.
_SIZE_RULES: tuple[tuple[tuple[str, ...], int], ...] = (
    (("kv_lora_rank", "q_lora_rank"), 32),
    (("qk_rope_head_dim", "rotary_dim", "rope_head_dim"), 8),
    (("qk_nope_head_dim",), 8),
    (("v_head_dim",), HEAD_DIM),
    (("head_dim", "attention_head_size", "d_kv"), HEAD_DIM),
    (("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "num_query_groups",
      "kv_heads"), KV_HEADS),
    (("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
      "decoder_attention_heads", "attention_heads"), HEADS),
    (("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers"), LAYERS),
    (("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "experts_per_token"), 2),
    (("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts", "n_experts"), 4),
    (("n_shared_experts", "num_shared_experts"), 1),
    (("n_group", "topk_group"), 1),
    (("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
      "moe_ffn_hidden_size"), 32),
    (("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "encoder_ffn_dim",
      "decoder_ffn_dim", "d_ff", "inner_dim", "ffn_size"), FFN),
    (("hidden_size", "n_embd", "d_model", "embed_dim", "dim", "n_embed", "model_dim", "embedding_size"), HIDDEN),
    (("vocab_size",), VOCAB),
)
_SKIP_KEYS = ("_token_id", "max_position", "window", "chunk", "rope", "rotary", "bucket", "vision",
              "audio", "image", "layer_idx", "layers_block", "dropout", "_id", "position", "type_vocab",
              "theta", "base")


def _rule(key: str) -> int | None:
    k = key.lower()
    if any(s in k for s in _SKIP_KEYS) and not any(k == p for p, _ in _flat_rules()):
        return None
    for pats, size in _SIZE_RULES:
        if any(p == k or k.endswith("_" + p) or k.startswith(p) for p in pats):
            return size
    return None


def _flat_rules():
    for pats, size in _SIZE_RULES:
        for p in pats:
            yield p, size


def shrink_config(config):
    """``config`` rebuilt tiny: every size field set by meaning (hidden 64, 2 layers, 4 heads /
    2 KV heads, head_dim 16, vocab 256, MoE 4 experts / 2 active; nested sub-configs and
    per-layer config lists too), then the config class constructed anew from those overrides so
    every field it derives (head_dim, layer_types, ...) follows.  Per-layer lists longer than the
    layer count are cut keeping distinct kinds; token ids outside the vocabulary move inside it."""
    cls = type(config)
    d = config.to_dict()
    over = _overrides(d)
    cfg = _make(cls, config, over)
    n = _get_any(cfg, ("num_hidden_layers", "n_layer", "num_layers")) or LAYERS
    # per-layer lists of the *default* depth, cut keeping distinct kinds (a derived list of the
    # new depth would often hold one kind only: Gemma 3's 5 sliding : 1 full)
    lists = {k: _keep_kinds(v, n) for k, v in d.items()
             if isinstance(v, list) and len(v) > n and "layer" in k.lower() and k not in over}
    if lists:
        cfg = _make(cls, config, {**over, **lists})
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def _overrides(d: dict) -> dict:
    """The fields of a config dict that shrink (recursively into sub-config dicts)."""
    over: dict = {}
    for key, value in d.items():
        if isinstance(value, dict) and value and key not in ("rope_parameters", "rope_scaling", "id2label",
                                                            "label2id", "quantization_config"):
            sub = _overrides(value)
            if sub:
                over[key] = {**value, **sub}
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            over[key] = [{**v, **_overrides(v)} for v in value[:LAYERS]]  # per-layer configs
        elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
            size = _rule(key)
            if size is not None:
                over[key] = min(value, size) if "layer" in key.lower() else size
        elif value is None and key == "head_dim":  # derived by some models, required by others
            over[key] = HEAD_DIM
        elif value is None and key == "num_key_value_heads":
            over[key] = HEADS
    if "qk_rope_head_dim" in d:  # MLA: head_dim names the rotary part; the config derives it
        over.pop("head_dim", None)
    vocab = over.get("vocab_size", d.get("vocab_size"))
    if isinstance(vocab, int):
        for key, value in d.items():
            if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
                over[key] = vocab - 1
            elif key.endswith("token_ids") and isinstance(value, list):
                over[key] = [min(v, vocab - 1) for v in value if isinstance(v, int)]
    heads, kv = d.get("num_attention_heads"), d.get("num_key_value_heads")
    if "num_key_value_heads" in over and isinstance(heads, int) and isinstance(kv, int) and kv >= heads:
        over["num_key_value_heads"] = over.get("num_attention_heads", HEADS)  # keep MHA families MHA
    if d.get("is_decoder") is False and "add_cross_attention" in d:
        over["is_decoder"] = True  # decoder-capable encoders are built as their causal LM
    return over


def _make(cls, config, over: dict):
    """``cls(**over)``; where the class rejects that, the old config with ``over`` set on a copy."""
    try:
        return cls(**over)
    except Exception:  # noqa: BLE001 - some configs only take their own full set of fields
        cfg = copy.deepcopy(config)
        for k, v in over.items():
            _set(cfg, k, v)
        return cfg


def _keep_kinds(values: list, n: int) -> list:
    """``n`` entries of a per-layer list, covering as many distinct values as possible, in order."""
    picked, seen = [], set()
    for i, v in enumerate(values):
        key = json.dumps(v, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            picked.append(i)
    idx = sorted(picked[:n] + [i for i in range(len(values)) if i not in picked][: max(0, n - len(picked))])
    return [values[i] for i in idx[:n]]


def _get_any(cfg, keys):
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _set(cfg, key, value) -> None:
    with contextlib.suppress(Exception):
        setattr(cfg, key, value)


class OutOfScope(Exception):
    """A family the zoo does not try (multimodal)."""


def build(model_type: str, kind: str = "causal", seed: int = 0):
    """The family's tiny random model (fp32, eval, eager-or-SDPA attention as the family
    defaults), or raises.  Multimodal configs (vision/audio sub-configs) raise :class:`OutOfScope`."""
    from transformers import AutoConfig

    cls = _class_for(model_type, kind)
    cfg = AutoConfig.for_model(model_type)
    if any(k in cfg.to_dict() for k in ("vision_config", "audio_config", "speech_config", "vq_config",
                                         "image_size", "visual", "vision_tower_config")):
        raise OutOfScope("multimodal config (vision/audio): out of scope")
    cfg = shrink_config(cfg)
    torch.manual_seed(seed)
    model = cls(cfg)
    return model.float().eval()


# ------------------------------------------------------------------------- the oracle
_SDPA_OPS = ("scaled_dot_product", "_flash_attention", "_efficient_attention")


class _CoreCounter(TorchDispatchMode):
    """Counts attention cores as dispatched: SDPA kernels, and softmaxes over [.., S, >=S]."""

    def __init__(self, seq: int):
        super().__init__()
        self.seq, self.count = seq, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(s in name for s in _SDPA_OPS) and "backward" not in name:
            self.count += 1
        elif name.split(".")[0] in ("_softmax", "_safe_softmax", "softmax"):
            x = args[0]
            if x.dim() >= 3 and x.shape[-2] == self.seq and x.shape[-1] >= self.seq:
                self.count += 1
        return func(*args, **(kwargs or {}))


def count_cores(model, inputs: dict) -> tuple[int, object]:
    """(attention cores one forward of ``model`` on ``inputs`` runs, its output)."""
    seq = int(inputs["input_ids"].shape[-1])
    with torch.no_grad(), _CoreCounter(seq) as counter:
        out = run_cache_free(model, inputs)
    return counter.count, out


def _first_float(out) -> torch.Tensor | None:
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves(out if not hasattr(out, "to_tuple") else out.to_tuple()):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


# ------------------------------------------------------------------------- the checks
def _form_check(base, form, size_fn, visibility: bool, n_sites: int, ref_out, inputs) -> dict:
    """Apply ``form`` to a copy of ``base`` (an all-Full optimised model): applied / refused /
    noop / crash, with the measured cache bytes."""
    try:
        m = copy.deepcopy(base)
        m = retarget(m, form) if visibility else optimize(m, form)
        mods = [x for x in m.modules() if isinstance(x, KVAttention)]
        # a module run for several layers (ALBERT) rewrites each of them
        changed = sum(len(x.kv_core.layers) for x in mods if x.kv_core.forms != (Full(),))
        before, after = size_fn(base), size_fn(m)
        with torch.no_grad():
            out = _first_float(run_cache_free(m, inputs))
        finite = out is not None and bool(torch.isfinite(out).all())
        diff = _real_diff(out, ref_out, inputs)
    except KVPassError as e:
        return {"status": "refused", "reason": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - a bug, reported as such
        return {"status": "crash", "reason": _exc(e)}
    res = {"bytes_before": before, "bytes_after": after, "layers": changed, "diff": diff}
    if changed < n_sites or after >= before:
        return {"status": "noop", "reason": f"{changed}/{n_sites} layers rewritten, cache {before} -> {after} B",
                **res}
    if not finite:
        return {"status": "crash", "reason": "non-finite output", **res}
    return {"status": "applied", **res}


def _real_diff(a, b, inputs: dict) -> float | None:
    """Max |a - b| over real tokens: where the sample's attention mask marks padding, a query's
    output is whatever the model makes of a fully masked row, which nothing downstream reads."""
    if a is None or b is None or a.shape != b.shape:
        return None
    d = (a - b).abs()
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and d.dim() >= 2 and tuple(d.shape[:2]) == tuple(mask.shape):
        d = d[mask.bool()]
    return float(d.max()) if d.numel() else 0.0


def _exc(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)
                  if f"{os.sep}kvpass{os.sep}" in f.filename), "")
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}" + (f" ({where})" if where else "")


def check_family(model_type: str, kind: str = "causal") -> dict:
    """Build ``model_type`` tiny and run every zoo check on it (see the module docstring)."""
    row: dict = {"model_type": model_type, "kind": kind}
    t0 = time.perf_counter()
    try:
        model = build(model_type, kind)
        row["class_name"] = type(model).__name__
        inputs = default_example_inputs(model)
        cores, out = count_cores(model, inputs)
        ref = _first_float(out)
    except OutOfScope as e:
        return {**row, "class": "SKIPPED", "reason": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001 - transformers itself can't build/run it tiny
        return {**row, "class": "UNBUILDABLE", "reason": _exc(e)}
    row["cores"] = cores
    row["build_s"] = round(time.perf_counter() - t0, 2)
    try:
        fast = optimize(model, Full(), example_inputs=inputs)
    except KVPassError as e:
        cls = "NO_ATTENTION" if cores == 0 else "NOT_FOUND"
        return {**row, "class": cls, "sites": 0, "reason": str(e).splitlines()[0][:300]}
    except Exception as e:  # noqa: BLE001
        return {**row, "class": "CRASH", "reason": "optimize(Full()): " + _exc(e)}
    sites = fast._kvpass.sites
    row["sites"] = len(sites)
    row["site_problems"] = [p for s in sites for p in s.problems]
    row["core_problems"] = [p for s in sites for p in s.core_problems]
    row["kept"] = sorted(set(fast._kvpass.kept.values()))
    try:
        with torch.no_grad():
            got = _first_float(run_cache_free(fast, inputs))
    except Exception as e:  # noqa: BLE001
        return {**row, "class": "CRASH", "reason": "running optimize(Full()): " + _exc(e)}
    row["identity"] = _real_diff(got, ref, inputs)
    causal = all(s.causal for s in sites)
    tokens = 64
    size = (lambda m: kv_cache_bytes(m, tokens))
    forms = {}
    if causal:
        forms["window"] = _form_check(fast, Window(size=4, sinks=1), size, True, len(sites), ref, inputs)
        forms["quantize"] = _form_check(fast, Quantize(bits=8, group=8), size, True, len(sites), ref,
                                        inputs)
    else:
        forms["sparse"] = _form_check(fast, Sparse(block=4, local=1, global_tokens=4), _sparse_size,
                                      True, len(sites), ref, inputs)
    kv = max((s.num_kv_heads for s in sites), default=1)
    if kv > 1:
        forms["shared_kv"] = _form_check(fast, SharedKV(kv_heads=max(1, kv // 2)),
                                         kv_bytes_per_token, False, len(sites), ref, inputs)
    row["forms"] = forms
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row.update(_classify(row))
    return row


def _sparse_size(m) -> int:
    """Visible key-query pairs of a 64-token bidirectional sequence, summed over layers (encoders
    keep no cache: a sparse layer saves attention work, which this counts)."""
    total = 0
    for x in m.modules():
        if isinstance(x, KVAttention):
            pattern = x.kv_core.plan.pattern
            total += 64 * 64 if pattern is None else int(pattern.table(64 // pattern.block).to_dense(64).sum())
    return total


def _classify(row: dict) -> dict:
    """The class of a measured row (the issue's definition): ``EXACT`` when every core the
    forward ran is a site whose core kvpass understands, ``Full()`` is the identity within
    :data:`IDENTITY_TOL` and every form was applied or refused with a clear
    :class:`~kvpass.KVPassError`.  Projection problems (a key path kvpass cannot trace back
    to one weight, e.g. MLA's latent) do not make a row PARTIAL: core forms still apply and the
    weight-changing forms refuse, naming the module — but the row's ``weights`` says so, and
    :func:`summary` counts the families whose every projection is traced apart
    (``weights_traced_share``)."""
    forms = row.get("forms", {})
    weights = {"weights": (row["site_problems"][0][:300] if row.get("site_problems") else "traced")}
    bad = [f"{k}: {v['status']} ({v.get('reason', '')})" for k, v in forms.items()
           if v["status"] in ("crash", "noop")]
    if bad:
        return {"class": "CRASH", "reason": bad[0], **weights}
    if row["sites"] < row["cores"]:
        return {"class": "PARTIAL", "reason": f"{row['sites']} of {row['cores']} attention cores found", **weights}
    core = row.get("core_problems", row["site_problems"])
    if core:
        return {"class": "PARTIAL", "reason": core[0][:300], **weights}
    if row.get("kept"):
        return {"class": "PARTIAL", "reason": "kept as the model has it: " + row["kept"][0][:280], **weights}
    if row["identity"] is None or not row["identity"] <= IDENTITY_TOL:
        return {"class": "PARTIAL", "reason": f"identity differs by {row['identity']}", **weights}
    if row["sites"] > row["cores"]:
        return {"class": "PARTIAL", "reason": f"{row['sites']} sites for {row['cores']} cores run", **weights}
    refused = [f"{k}: {v['reason']}" for k, v in forms.items() if v["status"] == "refused"]
    return {"class": "EXACT", "reason": refused[0][:300] if refused else "", **weights}


# --------------------------------------------------------------------------- the runner
def _worker(items: list[tuple[str, str]], timeout: int) -> None:
    """Check ``items`` one after another, one JSON line each on stdout (``SIGALRM`` bounds each)."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)

    def alarm(signum, frame):
        raise TimeoutError(f"over {timeout} s")

    signal.signal(signal.SIGALRM, alarm)
    for model_type, kind in items:
        signal.alarm(timeout)
        try:
            row = check_family(model_type, kind)
        except TimeoutError as e:
            row = {"model_type": model_type, "kind": kind, "class": "CRASH", "reason": f"timed out ({e})"}
        except BaseException as e:  # noqa: BLE001 - never lose the other families
            row = {"model_type": model_type, "kind": kind, "class": "CRASH", "reason": _exc(e)}
        finally:
            signal.alarm(0)
        print("ZOO " + json.dumps(row, default=str), flush=True)


def run(items: list[tuple[str, str]] | None = None, *, jobs: int = 2, timeout: int = 240,
        progress: bool = True, log: str | None = None) -> list[dict]:
    """Check every family (default: :func:`families`) in ``jobs`` worker processes; a worker
    that dies is restarted on the families it had left (the one it died on is a ``CRASH``).
    ``log``: a file that gets each row as a JSON line as soon as it is measured."""
    from tqdm.auto import tqdm

    items = list(items if items is not None else families())
    queues = [items[i::jobs] for i in range(jobs)]
    rows: dict[tuple[str, str], dict] = {}
    bar = tqdm(total=len(items), desc="kvpass zoo", disable=not progress)
    procs: dict = {}

    def start(q):
        if not q:
            return None
        cmd = [sys.executable, "-c", "import sys, json; from kvpass.eval.zoo import _worker; "
               f"_worker(json.loads(sys.argv[1]), {timeout})", json.dumps(q)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    for i, q in enumerate(queues):
        procs[i] = (start(q), q)
    while any(p is not None for p, _ in procs.values()):
        live = {p.stdout: i for i, (p, _) in procs.items() if p is not None}
        ready, _, _ = select.select(list(live), [], [], 5.0)
        for f in ready:
            i = live[f]
            proc, q = procs[i]
            line = f.readline()
            if line.startswith("ZOO "):
                row = json.loads(line[4:])
                rows[(row["model_type"], row["kind"])] = row
                if log:
                    with open(log, "a") as fh:
                        fh.write(json.dumps(row, default=str) + "\n")
                bar.update(1)
                bar.set_postfix_str(f"{row['model_type']}: {row['class']}")
                continue
            if line:
                continue
            proc.wait()
            left = [it for it in q if tuple(it) not in rows]
            if left:  # died mid-family: that one crashed, the rest go on
                dead = tuple(left[0])
                rows[dead] = {"model_type": dead[0], "kind": dead[1], "class": "CRASH",
                              "reason": f"worker process died (exit {proc.returncode})"}
                bar.update(1)
                left = left[1:]
            procs[i] = (start(left), left)
    bar.close()
    return [rows[tuple(it)] for it in items if tuple(it) in rows]


def summary(rows: list[dict]) -> dict:
    """Counts per class and the issue's goal ratios."""
    counts = {c: sum(1 for r in rows if r["class"] == c) for c in CLASSES}
    buildable = [r for r in rows if r["class"] not in ("UNBUILDABLE", "SKIPPED", "NO_ATTENTION")]
    found = [r for r in buildable if r.get("sites")]
    causal_found = [r for r in found if "window" in r.get("forms", {})]

    def share(xs, ok):
        return None if not xs else sum(1 for r in xs if ok(r)) / len(xs)

    return {
        "families": len(rows), "counts": counts, "buildable": len(buildable),
        "exact_share": share(buildable, lambda r: r["class"] == "EXACT"),
        "weights_traced_share": share(buildable, lambda r: r["class"] == "EXACT" and r.get("weights") == "traced"),
        "window_applied_share": share(causal_found, lambda r: r["forms"]["window"]["status"] == "applied"),
        "quantize_applied_share": share(causal_found, lambda r: r["forms"]["quantize"]["status"] == "applied"),
        "silent_noops": sum(1 for r in rows for v in r.get("forms", {}).values() if v["status"] == "noop"),
    }


def write_json(rows: list[dict], path: str) -> None:
    """The rows, the summary and the versions they were measured with, written atomically."""
    import platform

    import transformers

    data = {"summary": summary(rows), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "rows": rows}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def markdown_table(rows: list[dict]) -> str:
    """One line per family: class, cores run / sites found, identity error, each form's status."""
    s = summary(rows)
    pct = (lambda x: "n/a" if x is None else f"{100 * x:.1f}%")
    head = [f"{s['families']} families: " + ", ".join(f"{c} {n}" for c, n in s["counts"].items() if n) + ".",
            f"EXACT {pct(s['exact_share'])} of {s['buildable']} buildable; Window applied on "
            f"{pct(s['window_applied_share'])} and Quantize on {pct(s['quantize_applied_share'])} of causal "
            f"families with a core found; silent no-ops: {s['silent_noops']}.", "",
            "| family | kind | class | cores / sites | identity | window or sparse | quantize | shared_kv "
            "| first problem or refusal |",
            "|---|---|---|---|---|---|---|---|---|"]
    lines = []
    for r in rows:
        f = r.get("forms", {})
        vis = f.get("window") or f.get("sparse")
        cell = (lambda v: "" if v is None else v["status"])
        ident = "" if r.get("identity") is None else f"{r['identity']:.0e}"
        cs = f"{r.get('cores', '')} / {r.get('sites', '')}" if "cores" in r else ""
        reason = str(r.get("reason", "")).replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r['model_type']} | {r['kind']} | {r['class']} | {cs} | {ident} | {cell(vis)} | "
                     f"{cell(f.get('quantize'))} | {cell(f.get('shared_kv'))} | {reason} |")
    return "\n".join(head + lines)

"""The automatic zoo: every transformers text architecture through kvpass, one command.

Runs :func:`kvpass.eval.zoo.run` over every causal-LM and text-encoder model type transformers
registers (tiny random builds; see :mod:`kvpass.eval.zoo`), writes the rows and the summary to
``bench/results/zoo.json`` and regenerates the README's zoo section (between the
``<!-- zoo:start -->`` / ``<!-- zoo:end -->`` markers) from that file.

    python bench/zoo.py                      # run all (~10 min on 2 cores), write JSON + README
    python bench/zoo.py --readme-only        # regenerate the README section from the JSON
    python bench/zoo.py --only llama bloom   # a few families, table on stdout (JSON/README untouched)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "zoo.json"
README = ROOT / "README.md"
START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"


def readme_section(data: dict) -> str:
    from kvpass.eval import zoo

    rows = data["rows"]
    s = data["summary"]
    lines = [START, "",
             f"Measured by `python bench/zoo.py` (transformers {data['transformers']}, torch {data['torch']}; "
             "tiny random builds, fp32, CPU). Counts:", "",
             "| class | families |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in s["counts"].items()]
    pct = (lambda x: "n/a" if x is None else f"{100 * x:.1f}%")
    lines += ["",
              f"- EXACT: **{pct(s['exact_share'])}** of the {s['buildable']} buildable families with attention "
              "(every core the forward runs found and understood, `Full()` within 1e-4 of the original on "
              "real tokens, every form applied or refused with a clear `KVPassError`).",
              f"- Strict: **{pct(s['weights_traced_share'])}** are EXACT with every projection traced back to its "
              "weights as well (the others refuse `SharedKV`/`MHC`, naming the module and the op that did not "
              "match: mostly MLA, whose keys are assembled from a latent and a shared rope key).",
              f"- `Window` applied on **{pct(s['window_applied_share'])}** and `Quantize` on "
              f"**{pct(s['quantize_applied_share'])}** of the causal families where a core was found (the rest refused "
              "with the site's named problem).",
              f"- Silent no-ops: **{s['silent_noops']}**; CRASH rows: **{s['counts']['CRASH']}**.", "",
              "<details><summary>One row per family (cores the forward ran / sites kvpass found)</summary>", "",
              zoo.markdown_table(rows).split("\n\n", 1)[1], "", "</details>", "", END]
    return "\n".join(lines)


def update_readme(data: dict) -> None:
    text = README.read_text()
    section = readme_section(data)
    if START in text and END in text:
        a, b = text.index(START), text.index(END) + len(END)
        text = text[:a] + section + text[b:]
    else:
        raise SystemExit(f"README.md has no {START} ... {END} section to fill")
    tmp = README.with_suffix(f".md.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, README)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="model types (prints the table only)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=240)
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--readme-only", action="store_true", help="regenerate README from --json")
    args = ap.parse_args(argv)
    from kvpass.eval import zoo

    if args.readme_only:
        update_readme(json.loads(Path(args.json).read_text()))
        return 0
    fams = zoo.families()
    if args.only:
        fams = [f for f in fams if f[0] in set(args.only)]
    rows = zoo.run(fams, jobs=args.jobs, timeout=args.timeout, progress=True)
    print(zoo.markdown_table(rows))
    if args.only:
        return 0
    zoo.write_json(rows, args.json)
    update_readme(json.loads(Path(args.json).read_text()))
    print(f"wrote {args.json} and the README's zoo section", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

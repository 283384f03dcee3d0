"""Turns the benchmark CSVs into markdown.

  python bench/collect_results.py [--results-dir DIR] [--out summary.md] [--append bench/RESULTS.md]
                                  [--compact-out FILE] [--header FILE]

--out gets the full summary (goals, every row of every CSV); --append / --compact-out get the compact version
(goals + the headline batch sizes 1 and 16) that bench/RESULTS.md keeps for every GPU run. --header: a markdown
file (e.g. the GPU suite's step table) put first in both. Without --out/--append the full text is printed.
"""

import argparse
import csv
import datetime
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHOW = ["op", "impl", "shape", "dtype", "median_us", "gb_per_s", "pct_of_floor", "floor_us", "speedup_vs_eager",
        "speedup_vs_compile", "note"]
VERIFY_OPS = ("verify_greedy", "verify_sample")
HEADLINE_BATCHES = ("1", "16")


def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _ours(impl: str) -> bool:
    return not impl.startswith("torch-") and "prologue" not in impl and "interpreter" not in impl


def load(results_dir: str):
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.csv"))):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if rows:
            out.append((os.path.basename(path)[:-4], rows))
    return out


def goals(tables) -> list:
    """The issue's goals, checked on whatever rows exist: memory-bound ops at B=1 within 1.2x of the floor
    (pct_of_floor >= 83 %), verify ops under 10 us at B=1, V=32000, N=6."""
    lines = ["| goal | op | shape | best impl | us | % of floor | met |", "|---|---|---|---|---|---|---|"]
    for name, rows in tables:
        if rows[0].get("device", "").startswith("cpu"):
            continue
        best = {}
        for r in rows:
            if r.get("batch") != "1" or not _ours(r["impl"]) or _f(r["median_us"]) is None:
                continue
            key = (r["op"], r.get("case") or r["shape"])
            if key not in best or _f(r["median_us"]) < _f(best[key]["median_us"]):
                best[key] = r
        for (op, case), r in sorted(best.items()):
            us, pct = _f(r["median_us"]), _f(r.get("pct_of_floor"))
            if op in VERIFY_OPS:
                if "V=32000" in case and "N=6" in case and "chain" in case:
                    lines.append(f"| verify < 10 us (B=1, V=32000, chain 6) | {op} | {r['shape']} | {r['impl']} | "
                                 f"{us} | {r.get('pct_of_floor', '')} | {'yes' if us < 10 else 'NO'} |")
            elif pct is not None and (_f(r.get("floor_us")) or 0) >= 2.0:  # memory-bound: the floor is not ~0
                lines.append(f"| within 1.2x of floor (B=1) | {op} | {r['shape']} | {r['impl']} | {us} | {pct} | "
                             f"{'yes' if pct >= 100 / 1.2 else 'NO'} |")
    return lines if len(lines) > 2 else ["(no GPU rows: goals not evaluated)"]


def table(rows, batches=None) -> list:
    sel = [r for r in rows if batches is None or r.get("batch", "") in batches or not r.get("batch")]
    lines = ["| " + " | ".join(SHOW) + " |", "|" + "---|" * len(SHOW)]
    for r in sel:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in SHOW) + " |")
    return lines


def render(tables, compact: bool, header: str = "") -> str:
    if not tables:
        return header + "\n(no results)\n"
    r0 = tables[0][1][0]
    lines = [header.rstrip("\n")] if header else []
    lines.append(f"\n## {datetime.date.today()} — {r0.get('device', '?')}, torch {r0.get('torch', '?')}, "
                 f"triton {r0.get('triton', '?')}, git {r0.get('git_sha', '?')}"
                 f"{' (compact: batch 1 and 16; full sweep in the run folder results.tgz)' if compact else ''}\n")
    lines.append("### Goals (issue 6)\n")
    lines += goals(tables)
    try:
        from _common import PUBLISHED

        lines.append("\n### Context (published figures, not measured here)\n")
        lines += [f"- {k}: {v}" for k, v in PUBLISHED.items()]
    except ImportError:
        pass
    for name, rows in tables:
        mode = rows[0].get("mode", "")
        lines.append(f"\n### {name} ({len(rows)} rows{', ' + mode if mode else ''}; "
                     f"copy bandwidth {rows[0].get('copy_gb_per_s', '?')} GB/s)\n")
        lines += table(rows, HEADLINE_BATCHES if compact else None)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results-dir", default=os.environ.get("KANGAROO_BENCH_RESULTS")
                    or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--out", help="write the full summary here")
    ap.add_argument("--append", help="markdown file to append the compact summary to (bench/RESULTS.md)")
    ap.add_argument("--compact-out", help="also write the compact summary to this file")
    ap.add_argument("--header", help="markdown file to put first")
    args = ap.parse_args()
    header = open(args.header).read() if args.header and os.path.exists(args.header) else ""
    tables = load(args.results_dir)
    full = render(tables, compact=False, header=header)
    compact = render(tables, compact=True, header=header)
    if args.out:
        with open(args.out, "w") as f:
            f.write(full)
    if args.compact_out:
        with open(args.compact_out, "w") as f:
            f.write(compact)
    if args.append:
        with open(args.append, "a") as f:
            f.write(compact)
    if not (args.out or args.append or args.compact_out):
        print(full)
    else:
        print(compact)


if __name__ == "__main__":
    main()

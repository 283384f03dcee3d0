"""Turns bench/results/*.csv into a markdown section (printed, or appended to a file with --append)."""

import argparse
import csv
import datetime
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = ["op", "impl", "shape", "dtype", "median_us", "gb_per_s", "pct_of_floor", "floor_us", "speedup_vs_eager"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--append", help="markdown file to append to")
    args = ap.parse_args()
    lines = []
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.csv"))):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        r0 = rows[0]
        lines.append(f"\n### {os.path.basename(path)[:-4]} — {r0['device']}, torch {r0['torch']}, "
                     f"triton {r0['triton']}, git {r0['git_sha']}, {datetime.date.today()}\n")
        lines.append("| " + " | ".join(SHOW) + " |")
        lines.append("|" + "---|" * len(SHOW))
        for r in rows:
            lines.append("| " + " | ".join(str(r.get(c, "")) for c in SHOW) + " |")
    text = "\n".join(lines) + "\n"
    if args.append:
        with open(args.append, "a") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()

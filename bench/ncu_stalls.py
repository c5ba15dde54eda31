"""Where a kernel's warps wait: the warp-stall samples of an ``ncu`` source page, summed by reason, and the
instructions that hold the most samples with their main reasons.

    ncu --set full --import-source yes -k regex:NAME --launch-skip 5 --launch-count 1 -o report python3 ...
    ncu -i report.ncu-rep --page source --csv --print-source sass > source.csv
    python bench/ncu_stalls.py source.csv [--top 25]
"""

import argparse
import collections
import csv

ALL = "Warp Stall Sampling (All Samples)"


def number(text: str) -> float:
    return float(text.replace(",", "")) if text not in ("", "-") else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with open(args.csv) as f:
        rows = list(csv.reader(f))
    head = rows[1]  # (the first row names the kernel)
    column = {h: i for i, h in enumerate(head)}
    data = [r for r in rows[2:] if len(r) == len(head)]
    reasons = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    totals = collections.Counter()
    for r in data:
        for h in reasons:
            totals[h] += number(r[column[h]])
    samples = sum(totals.values())
    print("samples", samples, {h[6:]: round(v / samples * 100, 1) for h, v in totals.most_common(10)})
    for r in sorted(data, key=lambda r: -number(r[column[ALL]]))[:args.top]:
        main_reasons = sorted(((number(r[column[h]]), h[6:]) for h in reasons), reverse=True)[:3]
        print(f"{number(r[column[ALL]]) / samples * 100:5.1f}% {r[1].strip()[:60]:60s} "
              + " ".join(f"{h}:{v / samples * 100:.1f}" for v, h in main_reasons if v))


if __name__ == "__main__":
    main()

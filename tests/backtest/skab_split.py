#!/usr/bin/env python3
"""Split SKAB into a development and a held-out part for `edgegate backtest --labels`.

Usage: skab_split.py SKAB_DIR OUT_DIR
Makes OUT_DIR/dev and OUT_DIR/held (symlinks to the CSVs) and a labels.json in each: every
contiguous run of `anomaly == 1` is one incident window [first, last timestamp].

The split (written down before any tuning):
  dev:  valve1/*.csv (16), other/1..7.csv (leaks/additions, rotor imbalance), anomaly-free.csv
  held: valve2/*.csv (4),  other/8..14.csv (imbalance, water volume, cavitation, hot water)
"""
import csv, json, os, sys

skab, out = sys.argv[1], sys.argv[2]
parts = {
    "dev": [f"valve1/{i}.csv" for i in range(16)] + [f"other/{i}.csv" for i in range(1, 8)]
    + ["anomaly-free/anomaly-free.csv"],
    "held": [f"valve2/{i}.csv" for i in range(4)] + [f"other/{i}.csv" for i in range(8, 15)],
}
for part, files in parts.items():
    labels = {}
    for rel in files:
        src = os.path.join(skab, rel)
        dst = os.path.join(out, part, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
        windows, start, prev = [], None, None
        with open(src, newline="") as f:
            for row in csv.DictReader(f, delimiter=";"):
                on = float(row.get("anomaly") or 0) == 1.0
                if on and start is None:
                    start = row["datetime"]
                if not on and start is not None:
                    windows.append([start, prev])
                    start = None
                prev = row["datetime"]
        if start is not None:
            windows.append([start, prev])
        labels[rel] = windows
    with open(os.path.join(out, part, "labels.json"), "w") as f:
        json.dump(labels, f, indent=1)
    print(part, len(files), "files", sum(len(w) for w in labels.values()), "windows")

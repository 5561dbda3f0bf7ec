"""Where a backbone's kNN accuracy is lost on Fashion-MNIST: per class, and against the number of neighbours.

Reads the cached features that ``bench/quality.py`` (``tfssl eval``) left in a run's ``eval_cache/`` — the trained
backbone, the random-init one and raw pixels, train (the bank) and test — so it trains and embeds nothing:

    python bench/knn_classes.py runs/quality/wcl [runs/quality/ressl]   # later dirs fill in missing subjects

Prints, per subject, the weighted kNN (τ = 0.1) top-1 at k = 10, 20, 50, 100, 200 and the majority kNN at k = 20,
then per class the weighted k = 200 and majority k = 20 top-1 (bench/QUALITY.md §E uses it).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
KS = (10, 20, 50, 100, 200)


def subjects(cache):
    """subject → (train npz, test npz) of a run's eval cache: trained, random_init, pixels."""
    found = {}
    for test in sorted(glob.glob(os.path.join(cache, "*-test-*.npz"))):
        name = os.path.basename(test)
        kind = "pixels" if name.startswith("pixels-") else "random_init" if name.startswith("random-") else "trained"
        train = test.replace("-test-", "-train-")
        if os.path.isfile(train):
            found[kind] = (train, test)
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="bench/quality.py method directories (with eval_cache/); a subject "
                   "(trained, random_init, pixels) is read from the first that has it")
    args = p.parse_args()
    from tfssl.eval.knn import weighted_knn
    found = {}
    for run in args.runs:
        found = {**subjects(os.path.join(run, "eval_cache")), **found}
    if not found:
        raise SystemExit(f"{', '.join(args.runs)}: no cached train/test features in eval_cache/; run "
                         f"bench/quality.py first")
    per_class = {}
    for kind, (train, test) in found.items():
        with np.load(train) as a, np.load(test) as b:
            bank, bank_y, queries, y = a["features"], a["labels"], b["features"], b["labels"]
        row = []
        for k in KS:
            top1 = weighted_knn(bank, bank_y, queries, 10, k, 0.1)[:, 0]
            row.append(f"k={k} {100 * np.mean(top1 == y):.1f}")
            if k == 200:
                weighted = top1
        majority = weighted_knn(bank, bank_y, queries, 10, 20, None)[:, 0]
        print(f"{kind:12s} weighted τ=0.1: {', '.join(row)}; majority k=20 {100 * np.mean(majority == y):.1f}")
        per_class[kind] = [(100 * np.mean(weighted[y == c] == c), 100 * np.mean(majority[y == c] == c))
                           for c in range(10)]
    print("\nper class, weighted k=200 / majority k=20:")
    print("class    " + "".join(f"{kind:>16s}" for kind in per_class))
    for c, name in enumerate(CLASSES):
        print(f"{name:9s}" + "".join(f"{w:>9.1f} / {m:4.1f}" for w, m in (per_class[k][c] for k in per_class)))


if __name__ == "__main__":
    main()

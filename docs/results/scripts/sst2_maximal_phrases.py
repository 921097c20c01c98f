"""SST-2 train as independent calibration items: keep only maximal phrases.

SST-2 train holds every phrase of the treebank's parse trees: most rows are substrings of other
rows, so a random fit/test split puts a test item inside a fit item (or the other way around) and
the binomial test's independence assumption fails. This keeps only the phrases that are no
substring of a longer one (about the treebank's whole sentences), and adds a `group` column (the
lower-cased text) so exact duplicates also stay on one side of the split (--group-column group).

    python docs/results/scripts/sst2_maximal_phrases.py ../shared/data/sst2/train.tsv /tmp/sst2-train-maximal.tsv
    python docs/results/scripts/sst2_maximal_phrases.py ../shared/data/sst2/train.tsv /tmp/sst2-2000.tsv 2000

The optional third argument keeps a seeded random sample of that many maximal phrases (seed 0).

Reads the data from where it lies and writes outside the project: the data is not ours to copy.
"""

import csv
import random
import sys
from collections import defaultdict


def maximal_phrases(phrases: list[str]) -> list[bool]:
    """keep[i]: phrase i is not a substring of a longer phrase (token-aligned check via an index)."""
    tokens = [p.split() for p in phrases]
    holders = defaultdict(list)  # token -> indices of the phrases that contain it
    for i, toks in enumerate(tokens):
        for t in set(toks):
            holders[t].append(i)
    keep = []
    for i, (p, toks) in enumerate(zip(phrases, tokens)):
        if not toks:
            keep.append(False)
            continue
        rarest = min(set(toks), key=lambda t: len(holders[t]))
        padded = f" {p} "
        keep.append(not any(len(phrases[j]) > len(p) and padded in f" {phrases[j]} " for j in holders[rarest]))
    return keep


def main(src: str, dst: str, sample: str | None = None) -> None:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [r["sentence"].strip() for r in rows]
    keep = maximal_phrases(texts)
    if sample is not None:  # a seeded random subset of the maximal phrases, in their original order
        chosen = set(random.Random(0).sample([i for i, k in enumerate(keep) if k], int(sample)))
        keep = [i in chosen for i in range(len(keep))]
    with open(dst, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(["sentence", "label", "group"])
        for r, t, k in zip(rows, texts, keep):
            if k:
                w.writerow([t, r["label"].strip(), t.lower()])
    print(f"{sum(keep)} maximal phrases of {len(rows)} rows written to {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:4])

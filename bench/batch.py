#!/usr/bin/env python3
"""Batch scoring: `sentiflow predict` against scikit-learn's `predict_proba`, in one run.

Both score the same 100,000 reviews from a JSON Lines file (the 25,000 of the IMDB archive, as
`pipelines/imdb.yaml` cleaned them, four times over) and write one JSON line per review. sentiflow
uses models/tfidf (binary TF-IDF of 1-3-grams of words and punctuation, NB-SVM); scikit-learn a
TfidfVectorizer with the same n-grams, tokens and min_df and a logistic regression fitted on the
same training split (as in bench/api.py), so both compute the same features per review. Each
side reads the file, scores every review and writes the answers; the time includes loading the
model. The two take turns, round after round, so a noisy machine weighs on both alike.

Prints reviews per second, CPU time over wall time (how many cores were busy), peak RSS, and the
ratio.

Usage: bench/batch.py [--reviews 100000] [--rounds 3]
Needs: models/tfidf and data/imdb/split (run pipelines/imdb.yaml first, e.g. ./quickstart.sh
ARCHIVE) and `.venv/bin/pip install scikit-learn pyarrow psutil joblib`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import TRAIN_SKLEARN, median  # noqa: E402
from measure import run_or_exit  # noqa: E402

SCORE_SKLEARN = r"""
import json, sys, joblib
pipe = joblib.load(sys.argv[1])
ids, texts = [], []
with open(sys.argv[2]) as f:
    for line in f:
        row = json.loads(line)
        ids.append(row["id"])
        texts.append(row["text"])
proba = pipe.predict_proba(texts)[:, 1]
with open(sys.argv[3], "w") as out:
    for i, p in zip(ids, proba):
        out.write(json.dumps({"id": i, "label": "positive" if p > 0.5 else "negative", "score": float(p)}) + "\n")
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reviews", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each side once per round in turn")
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = ap.parse_args()
    import pyarrow.parquet as pq

    split = os.path.join(ROOT, "data", "imdb", "split")
    texts = []
    for part in ("train", "valid"):
        texts += pq.read_table(os.path.join(split, f"{part}.parquet"), columns=["text"]).column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        reviews = os.path.join(tmp, "reviews.jsonl")
        with open(reviews, "w") as f:
            for i in range(args.reviews):
                f.write(json.dumps({"id": i, "text": texts[i % len(texts)]}) + "\n")
        model = os.path.join(tmp, "model.joblib")
        train, score = os.path.join(tmp, "train.py"), os.path.join(tmp, "score.py")
        with open(train, "w") as f:
            f.write(TRAIN_SKLEARN)
        with open(score, "w") as f:
            f.write(SCORE_SKLEARN)
        subprocess.run([args.python, train, os.path.join(split, "train.parquet"), model], check=True)
        sklearn_out = os.path.join(tmp, "sk.jsonl")
        sides = {
            "sentiflow predict": [
                args.sentiflow,
                "predict",
                "--model",
                os.path.join(ROOT, "models", "tfidf"),
                "--input",
                reviews,
            ],
            "scikit-learn predict_proba": [args.python, score, model, reviews, sklearn_out],
        }
        results = {name: [] for name in sides}
        outputs = {"sentiflow predict": os.path.join(tmp, "sf.jsonl"), "scikit-learn predict_proba": sklearn_out}
        for r in range(args.rounds):
            for name, cmd in sides.items():
                with open(outputs[name] if name == "sentiflow predict" else os.devnull, "w") as out:
                    wall, cpu, peak, _, _ = run_or_exit(cmd, stdout=out)
                results[name].append((wall, cpu, peak))
                print(f"round {r + 1}: {name}: {args.reviews / wall:,.0f} reviews/s, {cpu / wall:.2f} cores busy")
                with open(outputs[name]) as written:
                    lines = sum(1 for _ in written)
                if lines != args.reviews:
                    sys.exit(f"{name} wrote {lines} lines for {args.reviews} reviews")
    print(f"\n{args.reviews:,} reviews, {os.cpu_count()} cores, medians of {args.rounds} rounds:")
    print(f"{'':28} {'reviews/s':>12} {'cores busy':>11} {'peak RSS':>10}")
    rate = {}
    for name, runs in results.items():
        wall = median([w for w, _, _ in runs])
        rate[name] = args.reviews / wall
        busy = median([c / w for w, c, _ in runs])
        peak = max(p for _, _, p in runs)
        print(f"{name:28} {rate[name]:>12,.0f} {busy:>11.2f} {peak / 2**20:>8.0f} MiB")
    ours, theirs = rate["sentiflow predict"], rate["scikit-learn predict_proba"]
    print(f"\nsentiflow / scikit-learn: {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The TF-IDF branch as the corpus grows: time and peak memory per stage, against scikit-learn.

Makes corpora of 25,000 to 1,000,000 reviews from the IMDB archive's 25,000 training reviews, by
recombining sentences: each synthetic review takes the number of sentences of a real review of
its label and draws that many sentences from all reviews of that label; every 20 consecutive
reviews share a synthetic movie, the group that the split and the folds keep on one side. The
corpus depends only on the archive, its size and --seed.

On each corpus, sentiflow runs the TF-IDF branch of `pipelines/imdb.yaml` (load, clean, a split
grouped by movie, binary 1-3-grams of words and punctuation with min_df 2, a 3-fold tune of
NB-SVM over C in {10, 30, 100}, the refit), one stage per process, so that each stage's time and
peak RSS are its own. scikit-learn runs the equivalent (TfidfVectorizer with the same settings,
GridSearchCV over LogisticRegression's C with 3 folds grouped by movie, the refit) at the sizes up
to --sklearn-max. A process that passes --max-rss is stopped and reported as such.

Prints a table per size and writes a plot of time and peak RSS against the number of reviews
(--plot, default docs/src/screenshots/scale.png).

Usage: bench/scale.py [--archive ../shared/data/imdb/aclImdb_train.tar.gz]
                      [--sizes 25000,100000,250000,1000000] [--sklearn-max 25000]
Needs: `.venv/bin/pip install scikit-learn psutil matplotlib`.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import run_measured  # noqa: E402

STAGES = ["load", "clean", "split", "vectorize", "tune", "train"]
PIPELINE = r"""name: scale
stages:
  load:
    uses: load
    with: {path: data/reviews.jsonl, text_column: text, label_column: label, group_column: movie,
           out: data/reviews.parquet}
  clean:
    uses: clean
    needs: [load]
    with: {lowercase: true, min_chars: 20, out: data/clean.parquet}
  split:
    uses: split
    needs: [clean]
    with: {validation: 0.2, seed: 42, group: movie, out: data/split}
  vectorize:
    uses: vectorize
    needs: [split]
    with: {ngram: [1, 3], min_df: 2, binary: true, token_pattern: "(?u)\\w+(?:'\\w+)*|[^\\w\\s]",
           out: data/tfidf}
  tune:
    uses: tune
    needs: [vectorize]
    with: {folds: 3, seed: 42, group: movie, models: [{model: nbsvm, C: [10, 30, 100]}],
           out: data/tune}
  train:
    uses: train
    needs: [split, vectorize, tune]
    with: {seed: 42, refit: true, out: data/model}
"""

SKLEARN = r"""
import json, sys
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold, GroupShuffleSplit
from sklearn.pipeline import Pipeline
texts, labels, movies = [], [], []
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line)
        texts.append(r["text"].lower()); labels.append(r["label"]); movies.append(r["movie"])
labels, movies = np.array(labels), np.array(movies)
train, valid = next(GroupShuffleSplit(1, test_size=0.2, random_state=42).split(texts, labels, movies))
pipe = Pipeline([("tfidf", TfidfVectorizer(ngram_range=(1, 3), binary=True, min_df=2, sublinear_tf=True,
                                           token_pattern=r"(?u)\w+(?:'\w+)*|[^\w\s]")),
                 ("lr", LogisticRegression(solver="liblinear"))])
search = GridSearchCV(pipe, {"lr__C": [10, 30, 100]}, cv=GroupKFold(3), n_jobs=1)
search.fit([texts[i] for i in train], labels[train], groups=movies[train])
print(search.score([texts[i] for i in valid], labels[valid]))
"""


def archive_reviews(path):
    """(text, label) of each training review in the archive, in a stable order."""
    found = []
    with tarfile.open(path) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 3 and parts[-3] == "train" and parts[-2] in ("pos", "neg"):
                text = tar.extractfile(m).read().decode("utf-8", "replace")
                found.append((m.name, text, 1 if parts[-2] == "pos" else 0))
    found.sort()
    return [(t, label) for _, t, label in found]


def make_corpus(reviews, n, seed, out):
    sentence = re.compile(r"(?<=[.!?])\s+")
    pools = {0: [], 1: []}
    counts = {0: [], 1: []}
    for text, label in reviews:
        parts = [s for s in sentence.split(text.replace("<br />", " ")) if s.strip()]
        pools[label] += parts
        counts[label].append(max(1, len(parts)))
    rng = random.Random(seed)
    with open(out, "w") as f:
        for i in range(n):
            label = rng.randrange(2)
            k = rng.choice(counts[label])
            text = " ".join(rng.choice(pools[label]) for _ in range(k))
            movie = f"tt{i // 20:08d}"
            f.write(json.dumps({"text": text, "label": label, "movie": movie}) + "\n")


def main():
    import psutil

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default=os.environ.get("SENTIFLOW_IMDB", "../shared/data/imdb/aclImdb_train.tar.gz"))
    ap.add_argument("--sizes", default="25000,100000,250000,1000000")
    ap.add_argument("--sklearn-max", type=int, default=25_000, help="largest corpus scikit-learn runs on")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--max-rss",
        type=float,
        default=psutil.virtual_memory().total * 0.8 / 2**30,
        help="GiB a process may take before it is stopped (default: 80%% of the memory)",
    )
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "src", "screenshots", "scale.png"))
    args = ap.parse_args()
    max_rss = args.max_rss * 2**30
    sizes = [int(s) for s in args.sizes.split(",")]
    reviews = archive_reviews(args.archive)
    results = {}  # size -> {"stages": {stage: Measured}, "sklearn": Measured or None}
    with tempfile.TemporaryDirectory(prefix="sentiflow-bench-scale-") as tmp:
        script = os.path.join(tmp, "sklearn_scale.py")
        with open(script, "w") as f:
            f.write(SKLEARN)
        for n in sizes:
            project = os.path.join(tmp, str(n))
            os.makedirs(os.path.join(project, "pipelines"))
            os.makedirs(os.path.join(project, "data"))
            with open(os.path.join(project, "pipelines", "scale.yaml"), "w") as f:
                f.write(PIPELINE)
            corpus = os.path.join(project, "data", "reviews.jsonl")
            make_corpus(reviews, n, args.seed, corpus)
            stages = {}
            for stage in STAGES:
                cmd = [args.sentiflow, "--quiet", "run", "pipelines/scale.yaml", "--stage", stage]
                m = stages[stage] = run_measured(cmd, cwd=project, max_rss=max_rss)
                print(f"{n:>9,} {stage:<10} {m.seconds:8.1f} s {m.peak_rss / 2**30:6.2f} GiB", file=sys.stderr)
                if m.failure:
                    print(f"          {m.failure}", file=sys.stderr)
                    break
            sk = None
            if n <= args.sklearn_max:
                sk = run_measured([args.python, script, corpus], cwd=project, max_rss=max_rss)
                print(f"{n:>9,} scikit-learn {sk.seconds:8.1f} s {sk.peak_rss / 2**30:6.2f} GiB", file=sys.stderr)
            results[n] = {"stages": stages, "sklearn": sk}
            subprocess.run(["rm", "-rf", project])

    print(f"\ncores: {os.cpu_count()}; memory {psutil.virtual_memory().total / 2**30:.0f} GiB; seed {args.seed}")
    print("| reviews | " + " | ".join(STAGES) + " | sentiflow total | peak RSS | scikit-learn | its peak RSS |")
    print("|---:|" + "---:|" * (len(STAGES) + 4))
    for n, r in results.items():
        ran = r["stages"]
        cells = [f"{ran[s].seconds:.1f} s" if s in ran else "" for s in STAGES]
        done = all(s in ran and not ran[s].failure for s in STAGES)
        total = sum(m.seconds for m in ran.values())
        peak = max(m.peak_rss for m in ran.values())
        sk = r["sklearn"]
        sk_cells = ["", ""] if sk is None else [f"{sk.seconds:.1f} s", f"{sk.peak_rss / 2**30:.2f} GiB"]
        if sk is not None and sk.failure:
            sk_cells[0] = "did not finish"
        print(
            f"| {n:,} | "
            + " | ".join(cells)
            + f" | {total:.1f} s{'' if done else ' (did not finish)'} | {peak / 2**30:.2f} GiB | "
            + " | ".join(sk_cells)
            + " |"
        )
    plot(results, args.plot)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = list(results)
    for stage in STAGES:
        xs = [n for n in sizes if stage in results[n]["stages"]]
        t_ax.plot(xs, [results[n]["stages"][stage].seconds for n in xs], marker="o", label=stage)
        m_ax.plot(xs, [results[n]["stages"][stage].peak_rss / 2**30 for n in xs], marker="o", label=stage)
    sk = [n for n in sizes if results[n]["sklearn"] is not None]
    t_ax.plot(sk, [results[n]["sklearn"].seconds for n in sk], "k--", marker="s", label="scikit-learn (all)")
    m_ax.plot(sk, [results[n]["sklearn"].peak_rss / 2**30 for n in sk], "k--", marker="s", label="scikit-learn (all)")
    t_ax.set_yscale("log")
    for ax, title in ((t_ax, "seconds per stage"), (m_ax, "peak RSS per stage, GiB")):
        ax.set_xscale("log")
        ax.set_xlabel("reviews")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    t_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    main()

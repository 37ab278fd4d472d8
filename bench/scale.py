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
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def measured(cmd, cwd, max_rss):
    """Runs cmd; returns (seconds, peak RSS bytes of its process tree, outcome)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        if peak > max_rss:
            for p in [*ps.children(recursive=True), ps]:
                p.kill()
            proc.wait()
            return time.perf_counter() - start, peak, f"stopped past --max-rss ({max_rss / 2**30:.1f} GiB)"
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return seconds, peak, f"failed ({proc.returncode}): {err.strip()[-300:]}"
    return seconds, peak, out.strip()


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
    results = {}  # size -> {"stages": {stage: (s, rss, outcome)}, "sklearn": (s, rss, outcome) or None}
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
                stages[stage] = measured(cmd, project, max_rss)
                s, rss, outcome = stages[stage]
                print(f"{n:>9,} {stage:<10} {s:8.1f} s {rss / 2**30:6.2f} GiB", file=sys.stderr)
                if outcome.startswith(("failed", "stopped")):
                    print(f"          {outcome}", file=sys.stderr)
                    break
            sk = None
            if n <= args.sklearn_max:
                sk = measured([args.python, script, corpus], project, max_rss)
                print(f"{n:>9,} scikit-learn {sk[0]:8.1f} s {sk[1] / 2**30:6.2f} GiB", file=sys.stderr)
            results[n] = {"stages": stages, "sklearn": sk}
            subprocess.run(["rm", "-rf", project])

    print(f"\ncores: {os.cpu_count()}; memory {psutil.virtual_memory().total / 2**30:.0f} GiB; seed {args.seed}")
    print("| reviews | " + " | ".join(STAGES) + " | sentiflow total | peak RSS | scikit-learn | its peak RSS |")
    print("|---:|" + "---:|" * (len(STAGES) + 4))
    for n, r in results.items():
        cells = [f"{r['stages'][s][0]:.1f} s" if s in r["stages"] else "" for s in STAGES]
        done = all(not r["stages"].get(s, (0, 0, "failed"))[2].startswith(("failed", "stopped")) for s in STAGES)
        total = sum(v[0] for v in r["stages"].values())
        peak = max(v[1] for v in r["stages"].values())
        sk = r["sklearn"]
        sk_cells = ["", ""] if sk is None else [f"{sk[0]:.1f} s", f"{sk[1] / 2**30:.2f} GiB"]
        if sk is not None and sk[2].startswith(("failed", "stopped")):
            sk_cells[0] = sk[2].split(":")[0]
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
        t_ax.plot(xs, [results[n]["stages"][stage][0] for n in xs], marker="o", label=stage)
        m_ax.plot(xs, [results[n]["stages"][stage][1] / 2**30 for n in xs], marker="o", label=stage)
    sk = [n for n in sizes if results[n]["sklearn"] is not None]
    t_ax.plot(sk, [results[n]["sklearn"][0] for n in sk], "k--", marker="s", label="scikit-learn (all)")
    m_ax.plot(sk, [results[n]["sklearn"][1] / 2**30 for n in sk], "k--", marker="s", label="scikit-learn (all)")
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

#!/usr/bin/env python3
"""TF-IDF pipeline: sentiflow against the equivalent scikit-learn script, in one run.

Runs the TF-IDF branch of `pipelines/imdb.yaml` cold (fresh cache, forced, up to `export_tfidf`)
on the 25,000-review archive, then the scikit-learn reference on the same archive and the same
movie-grouped train/validation split: TfidfVectorizer + LogisticRegression (liblinear) in
GridSearchCV(n_jobs=2) over ngram_range {(1,1), (1,2), (1,3)} x C {0.1, 1, 10, 100}
(12 configurations x 5 folds grouped by movie, StratifiedGroupKFold).

Prints wall time, peak RSS and validation accuracy of both, the vectorizer alone against
TfidfVectorizer.fit_transform, the no-op rerun, and the ratios.

Usage: bench/tfidf.py --data ../shared/data/imdb/aclImdb_train.tar.gz
Needs: scikit-learn, pyarrow, psutil (`.venv/bin/pip install scikit-learn pyarrow psutil`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import run_or_exit  # noqa: E402

SKLEARN_SCRIPT = r"""
import html, io, json, re, sys, tarfile, time
import joblib
import pyarrow.parquet as pq
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline

archive, split_dir, model_out = sys.argv[1:4]
TAG = re.compile(r"<[^>]*>")
def clean(t):
    return " ".join(html.unescape(TAG.sub(" ", t)).lower().split())

ids, texts, labels = [], [], []
with tarfile.open(archive) as tar:
    for m in tar:
        parts = m.name.split("/")
        if m.isfile() and len(parts) == 4 and parts[1] == "train" and parts[2] in ("pos", "neg"):
            ids.append("train_%s_%s" % (parts[2], parts[3].split("_")[0]))
            texts.append(clean(tar.extractfile(m).read().decode("utf-8")))
            labels.append(int(parts[2] == "pos"))
valid_ids = set(pq.read_table(split_dir + "/valid.parquet", columns=["id"]).column("id").to_pylist())
movie = dict(zip(*pq.read_table(split_dir + "/train.parquet", columns=["id", "movie"]).to_pydict().values()))
train = [i for i in range(len(ids)) if ids[i] not in valid_ids and ids[i] in movie]
valid = [i for i in range(len(ids)) if ids[i] in valid_ids]
Xtr, ytr = [texts[i] for i in train], [labels[i] for i in train]
Xva, yva = [texts[i] for i in valid], [labels[i] for i in valid]
pipe = Pipeline([("tfidf", TfidfVectorizer(sublinear_tf=True, min_df=2)),
                 ("lr", LogisticRegression(solver="liblinear"))])
grid = {"tfidf__ngram_range": [(1, 1), (1, 2), (1, 3)], "lr__C": [0.1, 1, 10, 100]}
search = GridSearchCV(pipe, grid, cv=StratifiedGroupKFold(5, shuffle=True, random_state=42), n_jobs=2)
search.fit(Xtr, ytr, groups=[movie[ids[i]] for i in train])
acc = search.score(Xva, yva)
joblib.dump(search.best_estimator_, model_out)
print(json.dumps({"best_params": {k: str(v) for k, v in search.best_params_.items()}, "valid_accuracy": acc,
                  "train_rows": len(train), "valid_rows": len(valid)}))
"""

SKLEARN_EXTRA = r"""
import json, sys, time
import pyarrow.parquet as pq
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

split_dir = sys.argv[1]
tr = pq.read_table(split_dir + "/train.parquet", columns=["text", "label"]).to_pydict()
va = pq.read_table(split_dir + "/valid.parquet", columns=["text", "label"]).to_pydict()
# The settings of the `vectorize` stage of pipelines/imdb.yaml.
t = time.perf_counter()
TfidfVectorizer(ngram_range=(1, 3), min_df=2, binary=True, token_pattern=r"(?u)\w+(?:'\w+)*|[^\w\s]").fit_transform(tr["text"])
fit_transform_s = time.perf_counter() - t
best = 0.0
for ngram in [(1, 1), (1, 2)]:
    vec = TfidfVectorizer(ngram_range=ngram, sublinear_tf=True, min_df=2)
    Xtr, Xva = vec.fit_transform(tr["text"]), None
    Xva = vec.transform(va["text"])
    for C in [0.1, 1, 10, 100]:
        acc = LogisticRegression(C=C, solver="liblinear").fit(Xtr, tr["label"]).score(Xva, va["label"])
        best = max(best, acc)
print(json.dumps({"fit_transform_s": fit_transform_s, "best_valid_accuracy": best}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("SENTIFLOW_IMDB", "../shared/data/imdb/aclImdb_train.tar.gz"))
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = ap.parse_args()
    data = os.path.abspath(args.data)
    pipeline = os.path.join(ROOT, "pipelines", "imdb.yaml")

    with tempfile.TemporaryDirectory(prefix="sentiflow-bench-") as tmp:
        env = dict(os.environ, SENTIFLOW_CACHE_DIR=os.path.join(tmp, "cache"))
        tfidf = ["--stage", "export_tfidf", "--set", f"data={data}"]
        sf_s, _, sf_rss, out, _ = run_or_exit([args.sentiflow, "run", pipeline, "--force", "--json", *tfidf], env=env)
        report = json.loads(out)
        stages = {s["name"]: s for s in report["stages"]}
        noop = []
        for _ in range(10):
            t = time.perf_counter()
            subprocess.run([args.sentiflow, "run", pipeline, *tfidf], env=env, check=True, capture_output=True)
            noop.append(time.perf_counter() - t)
        noop_s = sorted(noop)[len(noop) // 2]
        # The vectorizer alone, with both cores to itself (in the pipeline it shares them).
        out = run_or_exit(
            [
                args.sentiflow,
                "run",
                pipeline,
                "--stage",
                "vectorize",
                "--force",
                "--json",
                "--jobs",
                str(os.cpu_count()),
                "--set",
                f"data={data}",
            ],
            env=env,
        ).out
        vec = {s["name"]: s for s in json.loads(out)["stages"]}["vectorize"]["metrics"]
        vec_s = vec["fit_transform_seconds"]

        split_dir = os.path.join(ROOT, "data", "imdb", "split")
        script = os.path.join(tmp, "sk.py")
        with open(script, "w") as f:
            f.write(SKLEARN_SCRIPT)
        sk_s, _, sk_rss, sk_out, _ = run_or_exit(
            [args.python, script, data, split_dir, os.path.join(tmp, "model.joblib")]
        )
        sk = json.loads(sk_out.strip().splitlines()[-1])
        extra = os.path.join(tmp, "extra.py")
        with open(extra, "w") as f:
            f.write(SKLEARN_EXTRA)
        ex = json.loads(
            subprocess.run([args.python, extra, split_dir], check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )

    sf_acc = stages["train"]["metrics"]["accuracy"]
    tune = stages["tune"]["metrics"]
    mib = 1 << 20
    print(f"cores: {os.cpu_count()}; data: {data}")
    print(f"sentiflow best: {tune['best_model']} on {tune['best_vectorizer']} ({tune['trials']} trials x 5 folds)")
    print(f"scikit-learn GridSearchCV best: {sk['best_params']}\n")
    print("| measure | sentiflow | scikit-learn | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| whole pipeline, cold (s) | {sf_s:.1f} | {sk_s:.1f} | {sk_s / sf_s:.1f}x faster |")
    print(
        f"| vectorize (1-3-grams, binary): fit_transform of the training part (s) | {vec_s:.2f} | {ex['fit_transform_s']:.2f} | {ex['fit_transform_s'] / vec_s:.1f}x faster |"
    )
    print(f"| peak RSS (MiB) | {sf_rss / mib:.0f} | {sk_rss / mib:.0f} | {sk_rss / sf_rss:.1f}x less |")
    print(
        f"| validation accuracy, best model | {sf_acc:.4f} | {ex['best_valid_accuracy']:.4f} | {100 * (sf_acc - ex['best_valid_accuracy']):+.2f} points |"
    )
    print(
        f"| validation accuracy, GridSearchCV pick | {sf_acc:.4f} | {sk['valid_accuracy']:.4f} | {100 * (sf_acc - sk['valid_accuracy']):+.2f} points |"
    )
    print(f"| unchanged rerun (ms, median of 10) | {noop_s * 1000:.0f} | | |")
    print("\nper-stage seconds:", ", ".join(f"{n} {s['duration_ms'] / 1000:.2f}" for n, s in stages.items()))


if __name__ == "__main__":
    main()

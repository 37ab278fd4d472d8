#!/usr/bin/env python3
"""How well the TF-IDF bundle's reported validation accuracy predicts reviews of unseen movies.

IMDB's official test split holds movies that the training split never mentions. This repository
does not have it, so this rehearses the same situation inside the training archive: each round
holds out the reviews of a seeded 20 % of the movies (part B), writes the rest (part A) as an
archive in the official layout, runs `pipelines/imdb.yaml --stage export_tfidf` on A in a scratch
project, and then scores B with `sentiflow predict` and `sentiflow drift`.

Prints, per round: the bundle's validation accuracy (`metrics.accuracy` in its manifest), the
accuracy on B, the gap between the two, and the drift status of 1,000 B reviews on each statistic.
Part A has 80 % of the reviews, so the bundle here sees fewer reviews than one trained on the
whole archive: accuracy on B is a slightly pessimistic estimate of the official test accuracy.

Usage: bench/unseen_movies.py --data ../shared/data/imdb/aclImdb_train.tar.gz [--rounds 3] [--set refit=false]
Needs only the Python standard library and a release build (`cargo build --release`).
"""

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_archive(path):
    """(class, id) -> (rating, text) and (class, id) -> movie url, from an IMDB-layout archive."""
    reviews, urls = {}, {}
    with tarfile.open(path) as tar:
        for m in tar:
            r = re.fullmatch(r"(?:\./)?aclImdb/train/(pos|neg)/(\d+)_(\d+)\.txt", m.name)
            u = re.fullmatch(r"(?:\./)?aclImdb/train/urls_(pos|neg)\.txt", m.name)
            if r:
                reviews[(r[1], int(r[2]))] = (int(r[3]), tar.extractfile(m).read())
            elif u:
                for n, line in enumerate(tar.extractfile(m).read().decode().splitlines()):
                    urls[(u[1], n)] = line.strip()
    return reviews, urls


def write_archive(path, keys, reviews, urls):
    with tarfile.open(path, "w:gz", compresslevel=1) as out:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))

        for cls in ("pos", "neg"):
            mine = [k for k in keys if k[0] == cls]
            for new_id, key in enumerate(mine):
                rating, text = reviews[key]
                add(f"aclImdb/train/{cls}/{new_id}_{rating}.txt", text)
            add(f"aclImdb/train/urls_{cls}.txt", "".join(urls[k] + "\n" for k in mine).encode())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imdb/aclImdb_train.tar.gz")
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--pipeline", default=os.path.join(ROOT, "pipelines", "imdb.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--holdout", type=float, default=0.2, help="share of the movies held out")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pipeline parameter override, e.g. refit=false (repeatable)",
    )
    args = ap.parse_args()

    reviews, urls = read_archive(args.data)
    movies = sorted({urls[k] for k in reviews})
    rows = []
    for seed in range(1, args.rounds + 1):
        order = movies[:]
        random.Random(seed).shuffle(order)
        unseen = set(order[: round(len(order) * args.holdout)])
        part_a = sorted(k for k in reviews if urls[k] not in unseen)
        part_b = sorted(k for k in reviews if urls[k] in unseen)
        with tempfile.TemporaryDirectory(prefix="sentiflow-unseen-") as tmp:
            os.makedirs(os.path.join(tmp, "pipelines"))
            shutil.copy(args.pipeline, os.path.join(tmp, "pipelines", "imdb.yaml"))
            archive = os.path.join(tmp, "a.tar.gz")
            write_archive(archive, part_a, reviews, urls)
            held = os.path.join(tmp, "b.jsonl")
            with open(held, "w") as f:
                for i, k in enumerate(part_b):
                    text = reviews[k][1].decode()
                    f.write(
                        json.dumps({"id": i, "text": text, "label": "positive" if k[0] == "pos" else "negative"}) + "\n"
                    )
            sample = os.path.join(tmp, "b1000.jsonl")
            with open(held) as f, open(sample, "w") as g:
                lines = f.readlines()
                g.writelines(random.Random(seed).sample(lines, min(1000, len(lines))))

            env = dict(os.environ, SENTIFLOW_CACHE_DIR=os.path.join(tmp, "cache"))
            overrides = [a for kv in [f"data={archive}", *args.set] for a in ("--set", kv)]
            subprocess.run(
                [
                    args.sentiflow,
                    "run",
                    os.path.join(tmp, "pipelines", "imdb.yaml"),
                    "--stage",
                    "export_tfidf",
                    *overrides,
                ],
                env=env,
                check=True,
                capture_output=True,
            )
            bundle = os.path.join(tmp, "models", "tfidf")
            with open(os.path.join(bundle, "manifest.json")) as f:
                manifest = json.load(f)
            out = subprocess.run(
                [args.sentiflow, "predict", "--model", bundle, "--input", held],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            predicted = [json.loads(line)["label"] for line in out.splitlines()]
            with open(held) as f:
                truth = [json.loads(line)["label"] for line in f]
            accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
            drift = json.loads(
                subprocess.run(
                    [args.sentiflow, "drift", "--model", bundle, "--input", sample], capture_output=True, text=True
                ).stdout
            )
            statuses = {name: s["status"] for name, s in drift["statistics"].items()}
            rows.append(
                (
                    seed,
                    len(part_a),
                    len(part_b),
                    len(unseen),
                    manifest["metrics"]["accuracy"],
                    accuracy,
                    drift["status"],
                    statuses,
                    manifest.get("fitted_on"),
                )
            )

    print(f"data: {args.data}; pipeline: {args.pipeline}; {args.holdout:.0%} of {len(movies)} movies held out\n")
    print(
        "| round | part A reviews | part B reviews (movies) | validation accuracy (manifest) | accuracy on B | gap (points) | drift on 1,000 B reviews |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for seed, na, nb, nm, valid, acc, status, statuses, _ in rows:
        detail = ", ".join(f"{k} {v}" for k, v in statuses.items())
        print(
            f"| {seed} | {na:,} | {nb:,} ({nm}) | {valid:.4f} | {acc:.4f} | {100 * (valid - acc):+.2f} | {status} ({detail}) |"
        )

    def mean(xs):
        return sum(xs) / len(xs)

    print(
        f"\nmean validation accuracy {mean([r[4] for r in rows]):.4f}, mean accuracy on unseen movies "
        f"{mean([r[5] for r in rows]):.4f}, mean gap {100 * mean([r[4] - r[5] for r in rows]):+.2f} points; "
        f"exported weights fitted on {rows[-1][8]}"
    )


if __name__ == "__main__":
    main()

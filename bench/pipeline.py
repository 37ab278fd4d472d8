#!/usr/bin/env python3
"""Benchmarks the pipeline engine against DVC, in one run, on equivalent pipelines.

1. No-op rerun of a 10-stage pipeline: `sentiflow run` vs `dvc repro` when nothing changed.
2. Parallel speed-up: four independent CPU-bound stages, `--jobs 1` vs `--jobs 2`, and `dvc repro`
   (which runs stages one at a time).

Usage: bench/pipeline.py [--sentiflow target/release/sentiflow] [--dvc .venv/bin/dvc] [--runs 20]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chain_stages():
    """Ten command stages: a fan-out from one input and a chain joining them."""
    stages = []
    for i in range(10):
        if i == 0:
            deps, needs, cmd = ["input.txt"], [], "cat input.txt > out/s0.txt"
        elif i < 5:
            deps, needs, cmd = ["out/s0.txt"], ["s0"], f"cat out/s0.txt > out/s{i}.txt; echo {i} >> out/s{i}.txt"
        else:
            prev = [f"s{i - 5}", f"s{i - 1}"] if i > 5 else ["s4", "s3"]
            deps = [f"out/{p}.txt" for p in prev]
            needs = prev
            cmd = f"cat {' '.join(deps)} > out/s{i}.txt"
        stages.append((f"s{i}", cmd, deps, needs, [f"out/s{i}.txt"]))
    return stages


def cpu_stages(seconds_of_work):
    n = int(seconds_of_work * 6_000_000)
    cmd = f"python3 -c 'sum(i * i for i in range({n}))' && echo done > out/{{name}}.txt"
    return [(f"p{i}", cmd.format(name=f"p{i}"), [], [], [f"out/p{i}.txt"]) for i in range(4)]


def write_sentiflow(path, name, stages):
    lines = [f"name: {name}", "stages:"]
    for sname, cmd, deps, needs, outs in stages:
        lines += [f"  {sname}:", "    uses: command"]
        if needs:
            lines.append(f"    needs: [{', '.join(needs)}]")
        lines.append(f'    with: {{run: "{cmd}", deps: [{", ".join(deps)}], outs: [{", ".join(outs)}]}}')
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_dvc(path, stages):
    lines = ["stages:"]
    for sname, cmd, deps, _needs, outs in stages:
        lines += [f"  {sname}:", f'    cmd: "{cmd}"']
        if deps:
            lines.append(f"    deps: [{', '.join(deps)}]")
        lines.append(f"    outs: [{', '.join(outs)}]")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def timed(cmd, cwd):
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout}\n{r.stderr}")
    return elapsed


def median_of(cmd, cwd, runs):
    times = [timed(cmd, cwd) for _ in range(runs)]
    return statistics.median(times), min(times)


def project(stages, name):
    d = tempfile.mkdtemp(prefix=f"sentiflow-bench-{name}-")
    os.makedirs(os.path.join(d, "pipelines"))
    os.makedirs(os.path.join(d, "out"))
    with open(os.path.join(d, "input.txt"), "w") as f:
        f.write("hello\n" * 1000)
    write_sentiflow(os.path.join(d, "pipelines", f"{name}.yaml"), name, stages)
    subprocess.run(["git", "init", "-q"], cwd=d, check=True)
    return d


def dvc_project(stages, name, dvc):
    d = project(stages, name)
    write_dvc(os.path.join(d, "dvc.yaml"), stages)
    subprocess.run([dvc, "init", "-q"], cwd=d, check=True)
    # DVC refuses outputs that git tracks; keep them untracked but not ignored by DVC.
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    ap.add_argument("--dvc", default=shutil.which("dvc") or os.path.join(ROOT, ".venv", "bin", "dvc"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--work", type=float, default=1.0, help="seconds of CPU work per parallel stage")
    args = ap.parse_args()
    sf = os.path.abspath(args.sentiflow)
    if not os.path.exists(args.dvc):
        sys.exit(f"dvc not found at {args.dvc}: install it with `.venv/bin/pip install dvc` or pass --dvc")

    rows = []
    # 1. No-op rerun of 10 stages.
    stages = chain_stages()
    d = dvc_project(stages, "chain", args.dvc)
    timed([sf, "run", "pipelines/chain.yaml"], d)
    timed([args.dvc, "repro", "-q"], d)
    sf_med, sf_min = median_of([sf, "run", "pipelines/chain.yaml"], d, args.runs)
    dvc_med, dvc_min = median_of([args.dvc, "repro", "-q"], d, max(3, args.runs // 4))
    rows.append(("no-op rerun, 10 stages (median)", sf_med, dvc_med))
    shutil.rmtree(d)

    # 2. Four independent CPU-bound stages.
    stages = cpu_stages(args.work)
    d = dvc_project(stages, "par", args.dvc)
    # Alternate the settings and keep the median of three, so warm-up favours neither.
    j1s, j2s, dvs = [], [], []
    for _ in range(3):
        j1s.append(timed([sf, "run", "pipelines/par.yaml", "--force", "--jobs", "1"], d))
        j2s.append(timed([sf, "run", "pipelines/par.yaml", "--force", "--jobs", "2"], d))
        dvs.append(timed([args.dvc, "repro", "-f", "-q"], d))
    j1, j2, dv = (statistics.median(x) for x in (j1s, j2s, dvs))
    rows.append(("4 independent CPU stages, --jobs 1", j1, dv))
    rows.append(("4 independent CPU stages, --jobs 2", j2, dv))
    shutil.rmtree(d)

    print(f"cores: {os.cpu_count()}, runs: {args.runs}")
    print("| benchmark | sentiflow | dvc | dvc / sentiflow |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {b / a:.1f}x |")
    print(f"\nparallel speed-up of sentiflow (--jobs 1 / --jobs 2): {j1 / j2:.2f}x")
    print(
        f"no-op rerun target <= 50 ms: {'met' if sf_med <= 0.050 else 'MISSED'} ({sf_med * 1000:.1f} ms, best {sf_min * 1000:.1f} ms)"
    )


if __name__ == "__main__":
    main()

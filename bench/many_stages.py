#!/usr/bin/env python3
"""The engine's cost per stage: a pipeline of N independent `command` stages, each writing one
file, run cold and then unchanged (the no-op rerun). Prints seconds for each.

Usage: bench/many_stages.py [--stages 2000] [--sentiflow target/release/sentiflow]
"""

import argparse
import os
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=2000)
    ap.add_argument("--sentiflow", default=os.path.join(ROOT, "target", "release", "sentiflow"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sentiflow-many-") as tmp:
        os.makedirs(os.path.join(tmp, "pipelines"))
        pipeline = os.path.join(tmp, "pipelines", "many.yaml")
        with open(pipeline, "w") as f:
            f.write("name: many\nstages:\n")
            for i in range(args.stages):
                f.write(f"  s{i}: {{uses: command, with: {{run: 'echo {i} > out/{i}.txt', outs: [out/{i}.txt]}}}}\n")
        times = []
        for _ in ("cold", "no-op"):
            started = time.perf_counter()
            subprocess.run([args.sentiflow, "run", pipeline, "-q"], check=True)
            times.append(time.perf_counter() - started)
    print(f"{args.stages} command stages: cold run {times[0]:.2f} s, no-op rerun {times[1]:.2f} s")


if __name__ == "__main__":
    main()

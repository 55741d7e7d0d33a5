"""CPU threads and OpenMP's wait policy under a noisy neighbour (not a test).

Times single 64x64 images of the embedded default model in fresh processes, for each (threads,
OMP_WAIT_POLICY) pair, first on a quiet machine and then with one busy-looping process per CPU
beside it, and prints a markdown table of medians and p90s (ms) and the slowdown a neighbour causes.

    python bench/noisy_neighbour.py --images 15
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, time
from engine.config import EngineConfig
from engine.pipeline import load_pipeline
from engine.types import GenerationRequest
pipe = load_pipeline(EngineConfig(threads=int(sys.argv[1])))
pipe.warmup()
times = []
for i in range(int(sys.argv[2])):
    t = time.perf_counter()
    pipe.generate([GenerationRequest("a red circle on a blue background", i, 64, 64)])
    times.append(time.perf_counter() - t)
times.sort()
print(times[len(times) // 2] * 1000, times[int(len(times) * 0.9)] * 1000)
"""


def run(threads: int, policy: str | None, images: int) -> tuple[float, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(threads), str(images)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=15)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    cases = [(cpus, None), (cpus, "PASSIVE"), (1, None), (1, "PASSIVE")]
    quiet = {case: run(*case, args.images) for case in cases}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        noisy = {case: run(*case, args.images) for case in cases}
    finally:
        for burner in burners:
            burner.kill()
    print(
        f"| threads | OMP_WAIT_POLICY | quiet median / p90 (ms) | {cpus} busy neighbours median / p90 (ms) | slowdown |"
    )
    print("| --- | --- | --- | --- | --- |")
    for case in cases:
        (qm, qp), (nm, np_) = quiet[case], noisy[case]
        print(
            f"| {case[0]} | {case[1] or 'default'} | {qm:.1f} / {qp:.1f} | {nm:.1f} / {np_:.1f} | {nm / qm:.1f}x |"
        )


if __name__ == "__main__":
    main()

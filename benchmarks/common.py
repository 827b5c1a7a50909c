"""Helpers the benchmark scripts share: run a command in a fresh process and measure its CPU time."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_module(module: str, *args: str) -> tuple[dict, float]:
    """`python -m module args` in a fresh process: its last stdout line as JSON, and the CPU seconds it used.
    CPU time, not wall time: what a run gets does not depend on what else the machine runs."""
    before = children_cpu_seconds()
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), children_cpu_seconds() - before


def steps_for_cpu_seconds(module: str, args: list[str], output: Path, cpu_seconds: float,
                          calibration_steps: int = 20) -> int:
    """The number of training steps that `cpu_seconds` buys. Two short runs, of N and 6N steps, each
    with one validation at its end: their difference is the CPU cost of 5N steps, without the start-up,
    the data loading and the validation, which would dominate a short run. The start-up itself varies
    by a few CPU seconds between identical runs; with runs of N and 2N that noise was as large as the
    difference (the same photo recipe got 843 steps once and 2,566 another time)."""
    used = []
    for steps in (calibration_steps, 6 * calibration_steps):
        _, seconds = run_module(module, *args, "--output-dir", str(output), "--overwrite", "--max-steps", str(steps),
                                "--eval-every", str(steps), "--save-every", str(steps), "--no-progress")
        used.append(seconds)
    per_step = max(used[1] - used[0], 1e-3) / (5 * calibration_steps)
    return max(10, int(cpu_seconds / per_step))

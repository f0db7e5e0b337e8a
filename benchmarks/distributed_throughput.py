"""Meta-steps per second with 1 and with N gloo processes (torchrun) on this machine.

    python benchmarks/distributed_throughput.py --procs 1 2 --steps 10 [overrides ...]

Runs ``metanas-train`` (default configuration unless overridden, no validation, a 1-task
meta-test) once per process count and reads the meta-step times from ``train_log.csv``; the
first ``--skip`` steps (start-up) are left out. Prints one line per process count.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run(procs: int, steps: int, overrides: list[str], workdir: Path) -> list[float]:
    run_dir = workdir / f"procs{procs}"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={procs}", "-m", "metanas.cli",
           f"trainer.meta_steps={steps}", "trainer.val_every=0", "trainer.n_test_tasks=1",
           "trainer.ckpt_every=0", "device=cpu", f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(cmd, cwd=workdir, check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    with (run_dir / "train_log.csv").open() as f:
        return [float(r["time_s"]) for r in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2, help="start-up steps left out")
    parser.add_argument("overrides", nargs="*", help="metanas-train overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for procs in args.procs:
            times = run(procs, args.steps, args.overrides, Path(tmp))
            n = len(times) - args.skip
            rate = n / (times[-1] - times[args.skip - 1]) if args.skip else len(times) / times[-1]
            base = base or rate
            print(f"{procs} process(es): {rate:.3f} meta-steps/s ({1 / rate:.2f} s/step over {n} steps), "
                  f"{rate / base:.2f}x")


if __name__ == "__main__":
    main()

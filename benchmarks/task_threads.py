"""Task adaptation on one thread vs one thread per core.

Adapts the same Omniglot 5-way 1-shot tasks with the default small supernet once one task
after the other, and once on a TaskPool with a thread per core (torch kernels on one thread
each), and prints both wall times and their ratio.

    python benchmarks/task_threads.py [--tasks 10] [--workers 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from metanas.tasks import OmniglotTasks

from metanas.inner import InnerLoopConfig, adapt
from metanas.engines import TaskPool, default_workers
from metanas.search_space import SearchNetwork, SearchSpaceConfig, init_alphas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--workers", type=int, default=default_workers("cpu"))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(1)
    space = SearchSpaceConfig(in_channels=1, n_classes=5, channels=8, stem_multiplier=2,
                              n_cells=3, n_nodes=2, reduction_cells=(0, 1))
    net = SearchNetwork(space)
    weights, alphas = dict(net.named_parameters()), init_alphas(space)
    sampler, rng = OmniglotTasks(), np.random.default_rng(0)
    tasks = [sampler.sample("train", rng) for _ in range(args.tasks)]
    inner = InnerLoopConfig(steps=args.steps)

    def one(replica, task):
        return adapt(replica, weights, alphas, task.support_x, task.support_y, inner)

    one(net, tasks[0])  # warm-up
    start = time.perf_counter()
    for task in tasks:
        one(net, task)
    plain = time.perf_counter() - start
    with TaskPool(net, args.workers) as pool:
        pool.map(one, tasks[: args.workers])  # warm-up
        start = time.perf_counter()
        pool.map(one, tasks)
        threaded = time.perf_counter() - start
    print(f"{args.tasks} tasks, {args.steps} inner steps, small supernet")
    print(f"one after the other: {plain:.2f} s ({plain / args.tasks:.3f} s/task)")
    print(f"{args.workers} threads:          {threaded:.2f} s ({threaded / args.tasks:.3f} s/task)")
    print(f"speed-up: {plain / threaded:.2f}x")


if __name__ == "__main__":
    main()

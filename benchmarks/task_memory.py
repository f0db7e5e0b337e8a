"""Peak memory and time of adapting one task in MetaNAS's Omniglot configuration.

MetaNAS's own meta-training setting (Elsken et al. 2020; github.com/boschresearch/metanas,
scripts/run_og_meta_train.sh): the `search_space=metanas` supernet (4 cells, reductions at 1
and 3 without channel doubling, 3 nodes, 28 channels, the 7 few-shot ops), pairwise input
alphas, prune threshold 0.01, Adam inner loop at lr 0.005, temperature 1.0 -> 0.05, Reptile;
here 5-way tasks with 15 support images per class (75 images, 28x28). Variants, each in its own
process (its peak memory is its own), one Reptile task each:

- ``full``: 5 inner steps on the whole support set (metanas's default protocol);
- ``minibatch``: 5 epochs of mini-batches of 20 images (``inner.batch_size=20``, the
  reference's protocol: 20 updates);
- ``+cells`` / ``+edges`` after either: activations recomputed in the backward pass per cell
  (``trainer.recompute_cells``) or per edge (``trainer.recompute_edges``).

Peak memory is the growth of the process's peak resident set (``VmHWM``) over its resident
set after setup. Usage: ``python benchmarks/task_memory.py [--ways 5 --shots 15]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from dataclasses import replace


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _run(conn, variant: str, ways: int, shots: int, seed: int) -> None:
    import torch

    from metanas.algorithms import Reptile
    from metanas.inner import InnerLoopConfig
    from metanas.search_space import SearchNetwork, SearchSpaceConfig, init_alphas
    from metanas.tasks import Task

    torch.set_num_threads(1)
    space = SearchSpaceConfig(in_channels=1, n_classes=ways, channels=28, n_cells=4, n_nodes=3,
                              stem_multiplier=3, reduction_cells=(1, 3), reduction_channel_scale=1,
                              ops="metanas", pairwise_input_alphas=True, prune_threshold=0.01)
    torch.manual_seed(seed)
    net = SearchNetwork(space)
    net.recompute_cells = variant.endswith("+cells")
    net.recompute_edges = variant.endswith("+edges")
    weights = dict(net.named_parameters())
    alphas = {k: torch.nn.Parameter(v) for k, v in init_alphas(space).items()}
    inner = InnerLoopConfig(steps=5, lr_weights=0.005, lr_alphas=0.005, optimizer="adam",
                            temperature_start=1.0, temperature_end=0.05)
    if variant.startswith("minibatch"):
        inner = replace(inner, batch_size=20)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(ways).repeat_interleave(shots)
    task = Task(torch.rand(ways * shots, 1, 28, 28, generator=g), y,
                torch.rand(ways, 1, 28, 28, generator=g), torch.arange(ways), tuple(range(ways)))
    base = _status_kb("VmRSS")
    start = time.perf_counter()
    Reptile(batching="loop").meta_gradients(net, weights, alphas, [task], inner)
    seconds = time.perf_counter() - start
    conn.send((seconds, (_status_kb("VmHWM") - base) / 1024**2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=15)
    parser.add_argument("--variants", nargs="+", default=["full", "full+cells", "full+edges", "minibatch",
                                 "minibatch+cells", "minibatch+edges"])
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{args.ways}-way, {args.shots} support images per class, one Reptile task")
    print("| variant | seconds per task | peak memory (GiB) |\n| --- | --- | --- |")
    for variant in args.variants:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_run, args=(child, variant, args.ways, args.shots, 0))
        proc.start()
        seconds, gib = parent.recv()
        proc.join()
        print(f"| {variant} | {seconds:.1f} | {gib:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Channels-last vs NCHW pooling on CPU: forward+backward of PoolBN (one torch thread).

    python benchmarks/pools.py

Prints the best of 5 timings of 40 forward+backward passes of a batch of 5 for each shape.
"""

from __future__ import annotations

import time

import torch

from metanas.search_space.ops import PoolBN

SHAPES = [(16, 28, 2), (16, 14, 1), (32, 7, 1), (28, 28, 1), (56, 14, 1), (112, 7, 1)]


def bench(fn, x: torch.Tensor, n: int = 40) -> float:
    """Best per-call milliseconds of ``fn(x).sum().backward()`` over 5 rounds of ``n`` calls."""
    for _ in range(3):
        fn(x).sum().backward()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn(x).sum().backward()
        best = min(best, (time.perf_counter() - start) / n * 1e3)
    return best


def main() -> None:
    torch.set_num_threads(1)
    print("C  H  stride  kind  channels-last ms  NCHW ms  speed-up")
    for C, H, stride in SHAPES:
        x = torch.randn(5, C, H, H, requires_grad=True)
        for kind in ("max", "avg"):
            pool = PoolBN(kind, C, stride)
            fast = bench(pool, x)
            pool.channels_last_on_cpu = False
            plain = bench(pool, x)
            print(f"{C:<3}{H:<3}{stride:<8}{kind:<6}{fast:<18.3f}{plain:<9.3f}{plain / fast:.2f}x")


if __name__ == "__main__":
    main()

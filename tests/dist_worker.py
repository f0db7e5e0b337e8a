"""One process of a small float64 meta-training, alone or under torchrun (used by test_distributed).

usage: python dist_worker.py OUT RUN_DIR META_STEPS [RESUME_CKPT]

Environment: RANK/WORLD_SIZE/... as set by torchrun; DIE_RANK and DIE_STEP make that rank exit
abruptly before that meta-step (after HANG seconds if set); TIMEOUT_S sets the collective timeout. Rank 0 saves the final
meta-weights and meta-alphas to OUT.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_task, tiny_space

from metanas.algorithms import FOMAML
from metanas.distributed import DistributedError, exit_after_failed_collective, init_distributed
from metanas.inner import InnerLoopConfig
from metanas.search_space import SearchNetwork, init_alphas
from metanas.trainer import MetaTrainer, TrainerConfig


class Float64Tasks:
    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

    def sample(self, split, rng):
        return make_task(int(rng.integers(1 << 30)), dtype=torch.float64)


def main() -> int:
    out, run_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    dist = init_distributed("gloo", timeout_s=float(os.environ.get("TIMEOUT_S", "60")))
    space = tiny_space()
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    alphas = {k: v.double() for k, v in init_alphas(space, generator=torch.Generator().manual_seed(0)).items()}
    opt = functools.partial(torch.optim.Adam, lr=1e-2)
    trainer = MetaTrainer(
        net=net, alphas=alphas, sampler=Float64Tasks(), algorithm=FOMAML(),
        inner=InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.2),
        weights_optimizer=opt, alphas_optimizer=opt, search_space=space,
        cfg=TrainerConfig(meta_steps=steps, meta_batch_size=3, alpha_warmup_steps=1, val_every=2,
                          n_val_tasks=2, ckpt_every=2, n_test_tasks=2, task_workers=1, progress=False),
        run_dir=run_dir, seed=0, dist=dist,
    )
    if resume:
        trainer.resume(resume)
    die_rank, die_step = os.environ.get("DIE_RANK"), os.environ.get("DIE_STEP")
    if die_rank is not None and int(die_rank) == dist.rank:
        step_once = trainer.meta_step

        def dying_step():
            if trainer.step == int(die_step):
                if os.environ.get("HANG"):  # alive but stuck
                    time.sleep(float(os.environ["HANG"]))
                os._exit(3)
            return step_once()

        trainer.meta_step = dying_step
    try:
        trainer.fit()
    except DistributedError as exc:
        print(f"dist_worker: error: {exc}", file=sys.stderr)
        trainer.close()
        exit_after_failed_collective(1)  # as metanas-train does
    finally:
        trainer.close()
        dist.close()
    if dist.is_main:
        torch.save({"weights": {k: v.detach() for k, v in trainer.weights.items()},
                    "alphas": {k: v.detach() for k, v in trainer.alphas.items()},
                    "history": trainer.history}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

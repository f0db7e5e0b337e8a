"""Cross-domain transfer: what meta-learned architectures and weights buy on a new dataset.

Meta-trains on Omniglot (5-way 1-shot, the default ``metanas-train`` settings: small
supernet, first-order MAML, 5 inner steps, Adam meta-optimisers) and adapts to a dataset
of drawn shapes it has never seen (``metanas.tasks.synthetic.make_shapes_folder``: 20
classes, 20 images each, mixed sizes and formats). Compared, with the same inner loop and the
same sequence of target tasks:

* ``supernet, meta-learned``: weights and alphas meta-trained on Omniglot;
* ``supernet, random init``: the same supernet with its random initial weights and uniform
  alphas (what adaptation alone achieves);
* ``conv-4, meta-learned``: the fixed-architecture baseline (``metanas.baselines.Conv4``)
  meta-trained with the same algorithm, steps, tasks and meta-optimiser;
* ``conv-4, random init``.

Each is also meta-tested on Omniglot's evaluation alphabets. Accuracies are means over
tasks with the normal-approximation 95% interval. Writes ``benchmarks/results/transfer.md``
and ``transfer.json``::

    nice -n 19 python benchmarks/transfer.py [--meta-steps 60] [--tasks 200] \\
        [--checkpoint <run dir>/checkpoints/best.ckpt]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from metanas.tasks import OmniglotTasks
from metanas.tasks.image_folder import ImageFolderTasks
from metanas.tasks.synthetic import make_shapes_folder

from metanas.baselines import Conv4, Conv4Config
from metanas.checkpoint import load_checkpoint
from metanas.io import atomic_write_text
from metanas.cli import build_trainer
from metanas.evaluate import evaluate
from metanas.engines import TaskPool, default_workers
from metanas.search_space import SearchNetwork
from metanas.trainer import MetaTrainer, TrainerConfig

log = logging.getLogger("transfer")
RESULTS = Path(__file__).resolve().parent / "results"


def _config(meta_steps: int, seed: int):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose(
            "train",
            overrides=[f"trainer.meta_steps={meta_steps}", "trainer.val_every=0", f"seed={seed}",
                       "trainer.progress=false"],
        )


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-steps", type=int, default=60)
    parser.add_argument("--tasks", type=int, default=200, help="target tasks per model")
    parser.add_argument("--omniglot-tasks", type=int, default=100, help="Omniglot meta-test tasks")
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conv-channels", type=int, default=48,
                        help="conv-4 filters; 48 gives ~63k weights, close to the ~52k of the "
                             "small supernet's task networks (Finn et al. used 64)")
    parser.add_argument("--checkpoint", default=None, help="reuse a small-supernet checkpoint")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    cfg = _config(args.meta_steps, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="metanas-transfer-"))
    timings: dict[str, float] = {}

    # --- supernet meta-trained on Omniglot (or loaded)
    trainer = build_trainer(cfg, workdir / "supernet")
    torch.set_num_threads(max(1, torch.get_num_threads() // trainer.pool.workers))
    space, inner = trainer.search_space, trainer.inner
    random_super = {k: v.detach().clone() for k, v in trainer.weights.items()}
    random_alphas = {k: v.detach().clone() for k, v in trainer.alphas.items()}
    started = time.perf_counter()
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint, space.to_dict())
        with torch.no_grad():
            for group, live in (("weights", trainer.weights), ("alphas", trainer.alphas)):
                for name, p in live.items():
                    p.copy_(state[group][name])
        super_steps = int(state["step"])
    else:
        trainer.fit()
        super_steps = trainer.step
    timings["supernet_meta_train_s"] = time.perf_counter() - started
    meta_super = {k: v.detach().clone() for k, v in trainer.weights.items()}
    meta_alphas = {k: v.detach().clone() for k, v in trainer.alphas.items()}
    trainer.close()

    # --- conv-4 meta-trained the same way (same algorithm, optimiser, inner loop, task seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        conv = Conv4(Conv4Config(in_channels=1, n_classes=5, channels=args.conv_channels))
    random_conv = {k: v.detach().clone() for k, v in conv.named_parameters()}
    conv_trainer = MetaTrainer(
        net=conv, alphas={}, sampler=instantiate(cfg.task), algorithm=instantiate(cfg.algorithm),
        inner=inner, weights_optimizer=instantiate(cfg.optim.weights),
        alphas_optimizer=instantiate(cfg.optim.alphas), search_space=conv.cfg,
        cfg=TrainerConfig(meta_steps=super_steps, meta_batch_size=int(cfg.trainer.meta_batch_size),
                          val_every=0, ckpt_every=0, progress=False),
        run_dir=workdir / "conv4", seed=args.seed,
    )
    started = time.perf_counter()
    conv_trainer.fit()
    timings["conv4_meta_train_s"] = time.perf_counter() - started
    meta_conv = {k: v.detach().clone() for k, v in conv_trainer.weights.items()}
    conv_trainer.close()

    # --- target dataset: drawn shapes, all classes used for testing
    shapes_root = workdir / "shapes"
    make_shapes_folder(shapes_root, n_classes=20, n_images=20, seed=args.seed)
    shapes = ImageFolderTasks(shapes_root, n_way=5, k_shot=args.k_shot, q_query=15,
                              image_size=28, channels=1, split_fractions=[0, 0, 1])
    omniglot = OmniglotTasks(n_way=5, k_shot=args.k_shot, q_query=15)

    supernet = SearchNetwork(space)
    models = [
        ("supernet, meta-learned", supernet, meta_super, meta_alphas),
        ("supernet, random init", supernet, random_super, random_alphas),
        ("conv-4, meta-learned", conv, meta_conv, {}),
        ("conv-4, random init", conv, random_conv, {}),
    ]
    rows = []
    for name, net, weights, alphas in models:
        pool = TaskPool(net, default_workers("cpu"))
        row = {"model": name, "params": _n_params(net)}
        for dataset, sampler, n_tasks in (("shapes", shapes, args.tasks),
                                          ("omniglot", omniglot, args.omniglot_tasks)):
            if n_tasks < 1:
                continue
            started = time.perf_counter()
            res = evaluate(net, weights, alphas, sampler, "test", n_tasks, inner, space,
                           np.random.default_rng([args.seed, 7]), pool=pool)
            row[dataset] = {"accuracy": res.accuracy, "ci95": res.ci95, "n_tasks": n_tasks,
                            "time_s": time.perf_counter() - started}
            if res.genotypes:
                row[dataset]["unique_genotypes"] = res.diversity.get("unique_genotypes")
            log.info("%s on %s: %s", name, dataset, res.summary())
        pool.close()
        rows.append(row)

    out = Path(args.out)
    alpha_optimizer = inner.optimizer_name("alphas")
    settings = {
        "meta_steps": super_steps, "k_shot": args.k_shot, "n_way": 5, "q_query": 15,
        "inner": {"steps": inner.steps, "optimizer": inner.optimizer, "lr_weights": inner.lr_weights,
                  "optimizer_alphas": alpha_optimizer, "lr_alphas": inner.lr_alphas},
        "algorithm": str(cfg.algorithm._target_), "seed": args.seed, "checkpoint": args.checkpoint,
        "search_space": space.to_dict(), "conv4": conv.cfg.to_dict(), "timings": timings,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "transfer.json", json.dumps({"settings": settings, "rows": rows}, indent=2))
    lines = [
        f"# Transfer Omniglot -> drawn shapes (5-way {args.k_shot}-shot, 15 queries, 95% CI)",
        "",
        (f"Meta-training: {super_steps} meta-steps of first-order MAML on Omniglot (default "
        f"`metanas-train` settings); supernet {timings['supernet_meta_train_s']:.0f} s, conv-4 "
        f"{timings['conv4_meta_train_s']:.0f} s. Adaptation: {inner.steps} inner steps "
        f"({inner.optimizer} at {inner.lr_weights} for the weights, {alpha_optimizer} at {inner.lr_alphas} "
        "for the alphas), transductive batch statistics."),
        "",
        "| model | params | shapes accuracy (%) | Omniglot meta-test accuracy (%) |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = []
        for d in ("shapes", "omniglot"):
            cells.append(f"{100 * r[d]['accuracy']:.2f} +- {100 * r[d]['ci95']:.2f} ({r[d]['n_tasks']} tasks)"
                         if d in r else "-")
        lines.append(f"| {r['model']} | {r['params']:,} | {cells[0]} | {cells[1]} |")
    atomic_write_text(out / "transfer.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Progressive shrinking of the supernet: skipped ops, exact meta-gradients, the dominance
rule, checkpoints, resume and the command line."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_task, tiny_space
from metanas.adaptation import load_meta_model
from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.checkpoint import load_checkpoint, save_checkpoint
from metanas.errors import ConfigError
from metanas.inner import FUNC, InnerLoopConfig, adapt
from metanas.search_space import SearchNetwork, derive_genotype, full_op_mask, init_alphas
from metanas.shrink import ShrinkConfig, shrink_check, zero_counts
from metanas.trainer import MetaTrainer, TrainerConfig
from test_trainer import DyingTasks, Killed, RandomTasks

OPS = ("conv_3x3", "skip_connect", "avg_pool_3x3", "sep_conv_3x3")
KEPT = (0, 2)  # conv_3x3 and avg_pool_3x3 stay on every edge; skip_connect, sep_conv_3x3 go
INNER = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.2)


def mask_keeping(space, kept=KEPT):
    return {k: tuple(tuple(o in kept for o in range(space.n_ops)) for _ in rows)
            for k, rows in full_op_mask(space).items()}


def tiny_pair():
    """A float64 supernet with the ops of KEPT only kept, and a network built without the
    removed ops, with the same weights and alphas."""
    space = tiny_space(ops=OPS, pairwise_input_alphas=True)
    small_space = tiny_space(ops=tuple(OPS[o] for o in KEPT), pairwise_input_alphas=True)
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    net.set_op_mask(mask_keeping(space))
    small = SearchNetwork(small_space).double()
    weights = {k: v.detach().clone() for k, v in net.named_parameters()}
    small_weights = {}
    for name in dict(small.named_parameters()):
        parts = name.split(".")
        if len(parts) > 5 and parts[2] == "edges" and parts[4] == "ops":
            parts[5] = str(KEPT[int(parts[5])])
        small_weights[name] = weights[".".join(parts)].clone()
    alphas = {k: (v.double() * 400) for k, v in
              init_alphas(space, generator=torch.Generator().manual_seed(1)).items()}
    small_alphas = {k: (v[:, list(KEPT)] if v.dim() == 2 else v).clone() for k, v in alphas.items()}
    return (net, weights, alphas), (small, small_weights, small_alphas)


def removed_ops(net):
    for cell in net.cells:
        kind = "reduce" if cell.reduction else "normal"
        for e, edge in enumerate(cell.edges):
            for o, op in enumerate(edge.ops):
                if not net.op_mask[kind][e][o]:
                    yield op


def test_removed_ops_are_never_computed_on_either_gradient_backend():
    (net, weights, alphas), _ = tiny_pair()
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("a removed op was computed")

    for op in removed_ops(net):
        op.forward = refuse
    tasks = [make_task(s) for s in range(2)]
    w = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.clone().requires_grad_(True) for k, v in alphas.items()}
    for algorithm in (MAML(batching="loop"), MAML(batching="vmap"), FOMAML(batching="vmap"),
                      Reptile(batching="vmap")):
        algorithm.meta_gradients(net, w, a, tasks, INNER)
    adapt(net, weights, alphas, tasks[0].support_x, tasks[0].support_y, INNER, grads=FUNC)
    assert not calls
    # the kept ops' weights renormalise: a softmax over the kept logits alone
    logits = net(tasks[0].query_x, alphas)
    assert torch.isfinite(logits).all()


def test_flops_of_a_shrunk_supernet_are_those_of_its_kept_ops():
    from metanas.flops import count_flops

    (net, weights, alphas), (small, _, small_alphas) = tiny_pair()
    x = make_task(0).query_x
    full = SearchNetwork(net.cfg).double()
    shrunk = count_flops(lambda: net(x, alphas).sum().backward())
    assert shrunk == count_flops(lambda: small(x, small_alphas).sum().backward())
    assert shrunk < count_flops(lambda: full(x, alphas).sum().backward())


def test_soft_pruning_and_the_mask_together_skip_removed_ops():
    space = tiny_space(ops=OPS, prune_threshold=0.2)
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    net.set_op_mask(mask_keeping(space))
    for op in removed_ops(net):
        op.forward = None  # calling it would fail
    alphas = {k: v.double() * 400 for k, v in init_alphas(space, generator=torch.Generator().manual_seed(1)).items()}
    loss = net(make_task(0).query_x, alphas).sum()
    loss.backward()


def _meta_grads(algorithm, net, weights, alphas, tasks):
    w = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.clone().requires_grad_(True) for k, v in alphas.items()}
    return algorithm.meta_gradients(net, w, a, tasks, INNER)


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_meta_gradients_equal_those_of_a_network_without_the_removed_ops(algorithm, batching):
    make = {"maml": MAML, "fomaml": FOMAML, "reptile": Reptile}[algorithm]
    (net, weights, alphas), (small, small_weights, small_alphas) = tiny_pair()
    tasks = [make_task(s) for s in range(2)]
    got = _meta_grads(make(batching=batching), net, weights, alphas, tasks)
    ref = _meta_grads(make(batching=batching), small, small_weights, small_alphas, tasks)
    assert math.isclose(got.query_loss, ref.query_loss, rel_tol=1e-12)
    mapped = set()
    for name, g in ref.weights.items():
        parts = name.split(".")
        if len(parts) > 5 and parts[2] == "edges" and parts[4] == "ops":
            parts[5] = str(KEPT[int(parts[5])])
        big = ".".join(parts)
        mapped.add(big)
        torch.testing.assert_close(got.weights[big], g, rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in ref.weights.values())
    for name in set(got.weights) - mapped:  # the removed ops' weights: no gradient at all
        assert torch.count_nonzero(got.weights[name]) == 0, name
    for k, g in ref.alphas.items():
        if g.dim() == 2:
            torch.testing.assert_close(got.alphas[k][:, list(KEPT)], g, rtol=1e-9, atol=1e-12)
            removed = [o for o in range(len(OPS)) if o not in KEPT]
            assert torch.count_nonzero(got.alphas[k][:, removed]) == 0
        else:
            torch.testing.assert_close(got.alphas[k], g, rtol=1e-9, atol=1e-12)


def test_genotype_never_names_a_removed_op():
    space = tiny_space(ops=OPS)
    alphas = {k: torch.zeros(v.shape) for k, v in init_alphas(space).items()}
    for a in alphas.values():
        a[:, 3] = 5.0  # sep_conv_3x3 would win everywhere
        a[:, 1] = 1.0
    assert "sep_conv_3x3" in derive_genotype(alphas, space).to_json()
    genotype = derive_genotype(alphas, space, op_mask=mask_keeping(space, (0, 1)))
    ops = {op for kind in (genotype.normal, genotype.reduce) for node in kind for op, _ in node}
    assert ops == {"skip_connect"}
    # a dominant `none` at a low temperature: the kept op's weight underflows to 0 like the
    # removed op's, and the kept one must still be the edge's op
    space = tiny_space(ops=("none", "conv_3x3", "skip_connect"))
    alphas = {k: torch.zeros(v.shape) for k, v in init_alphas(space).items()}
    for a in alphas.values():
        a[:, 0] = 100.0
    genotype = derive_genotype(alphas, space, temperature=0.01, op_mask=mask_keeping(space, (0, 2)))
    ops = {op for kind in (genotype.normal, genotype.reduce) for node in kind for op, _ in node}
    assert ops == {"skip_connect"}


# ----------------------------------------------------------------------------- the rule
def _rule_space():
    return tiny_space(ops=("none", "skip_connect", "conv_3x3", "avg_pool_3x3"), n_cells=1, n_nodes=1,
                      reduction_cells=())


def test_dominance_rule_against_a_hand_computed_case():
    space = _rule_space()  # two edges, normal cells only
    alphas = init_alphas(space)
    # edge 0: weights proportional to 8, 4, 0.5, 1 -> with ratio 0.2 (threshold 1.6 of 8)
    # conv_3x3 (0.5) and avg_pool_3x3 (1) are dominated; edge 1: none dominates everything,
    # conv_3x3 is its strongest real op and protected
    alphas["normal"] = torch.log(torch.tensor([[8.0, 4.0, 0.5, 1.0], [100.0, 1.0, 3.0, 2.0]], dtype=torch.float64))
    cfg = ShrinkConfig(every=1, ratio=0.2, patience=2, min_ops=2)
    mask = full_op_mask(space)
    counts = zero_counts(mask)
    mask, counts, removed = shrink_check(alphas, mask, counts, space, cfg)
    assert removed == [] and mask == full_op_mask(space)
    assert counts["normal"] == ((0, 0, 1, 1), (0, 1, 1, 1))
    mask, counts, removed = shrink_check(alphas, mask, counts, space, cfg)
    # edge 0 may lose 2 (min_ops=2): conv_3x3 (smaller) then avg_pool_3x3; edge 1 loses
    # skip_connect and avg_pool_3x3 (tie of counts, the smaller weight first), conv protected
    assert [(r.edge, r.op) for r in removed] == [(0, "conv_3x3"), (0, "avg_pool_3x3"),
                                                 (1, "skip_connect"), (1, "avg_pool_3x3")]
    assert math.isclose(removed[0].weight, 0.5 / 13.5, rel_tol=1e-12)
    assert mask["normal"] == ((True, True, False, False), (True, False, True, False))
    # edge 0 now holds none (8/12) and skip (4/12): skip is not dominated; min_ops holds anyway
    mask2, counts2, removed = shrink_check(alphas, mask, counts, space, cfg)
    assert removed == [] and mask2 == mask
    assert counts2["normal"][0][:2] == (0, 0)


def test_min_ops_keeps_candidates_and_a_recovery_resets_the_count():
    space = _rule_space()
    alphas = init_alphas(space)
    alphas["normal"] = torch.log(torch.tensor([[8.0, 4.0, 0.5, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    cfg = ShrinkConfig(every=1, ratio=0.2, patience=1, min_ops=3)
    mask, counts, removed = shrink_check(alphas, full_op_mask(space), zero_counts(full_op_mask(space)),
                                         space, cfg)
    assert [(r.edge, r.op) for r in removed] == [(0, "conv_3x3")]  # only one may go
    assert counts["normal"][0] == (0, 0, 1, 1)  # avg_pool_3x3 stays a candidate
    alphas["normal"][0, 3] = math.log(7.0)  # avg_pool_3x3 recovers: its count resets
    _, counts, removed = shrink_check(alphas, mask, counts, space, cfg)
    assert removed == [] and counts["normal"][0][3] == 0


def test_the_strongest_real_op_of_an_edge_is_never_removed():
    space = _rule_space()
    alphas = init_alphas(space)
    # `none` dominates both edges; every other op is dominated, conv_3x3 (edge 0) and
    # avg_pool_3x3 (edge 1) are the strongest real ops
    alphas["normal"] = torch.log(torch.tensor([[100.0, 1.0, 3.0, 2.0], [100.0, 1.0, 2.0, 3.0]],
                                              dtype=torch.float64))
    cfg = ShrinkConfig(every=1, ratio=0.2, patience=1, min_ops=1)
    mask, _, removed = shrink_check(alphas, full_op_mask(space), zero_counts(full_op_mask(space)),
                                    space, cfg)
    assert [(r.edge, r.op) for r in removed] == [(0, "skip_connect"), (0, "avg_pool_3x3"),
                                                 (1, "skip_connect"), (1, "conv_3x3")]
    assert mask["normal"] == ((True, False, True, False), (True, False, False, True))


@pytest.mark.parametrize("key,value,expected", [
    ("ratio", 1.0, "trainer.shrink.ratio=1.0"), ("ratio", 0, "trainer.shrink.ratio=0"),
    ("every", -1, "trainer.shrink.every=-1"), ("patience", 0, "trainer.shrink.patience=0"),
    ("min_ops", 0, "trainer.shrink.min_ops=0"), ("start", 1.5, "trainer.shrink.start=1.5"),
])
def test_bad_settings_are_refused_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        ShrinkConfig(**{key: value})
    with pytest.raises(ConfigError, match="unknown trainer.shrink key"):
        TrainerConfig(shrink={"every": 1, "ratios": 0.1})


# ---------------------------------------------------------------------------- the trainer
SHRINK = dict(every=1, start=1, ratio=0.995, patience=2, min_ops=2)


def make_trainer(run_dir, algorithm=None, shrink=SHRINK, **cfg):
    space = tiny_space()
    torch.manual_seed(0)
    net = SearchNetwork(space)
    alphas = init_alphas(space, generator=torch.Generator().manual_seed(0))
    opt = functools.partial(torch.optim.Adam, lr=3e-3)
    settings = dict(meta_steps=6, meta_batch_size=2, val_every=3, n_val_tasks=2, ckpt_every=3,
                    n_test_tasks=2, progress=False, task_workers=2, shrink=shrink)
    settings.update(cfg)
    return MetaTrainer(
        net=net, alphas=alphas, sampler=RandomTasks(), algorithm=algorithm or FOMAML(),
        inner=INNER, weights_optimizer=opt, alphas_optimizer=opt, search_space=space,
        cfg=TrainerConfig(**settings), run_dir=run_dir, seed=0,
    )


@pytest.mark.parametrize("algorithm", [pytest.param(Reptile, marks=pytest.mark.slow), FOMAML],
                         ids=["reptile", "fomaml"])
def test_resume_after_shrinking_reproduces_the_uninterrupted_run(tmp_path, algorithm, caplog):
    straight = make_trainer(tmp_path / "a", algorithm(), val_every=0)
    with caplog.at_level("INFO", logger="metanas.trainer"):
        straight.fit()
    kept = [r["ops_kept"] for r in straight.history]
    full = 2 * straight.search_space.n_edges * straight.search_space.n_ops
    assert kept[2] < full and kept[-1] < kept[2], kept  # removals before and after the checkpoint
    assert "shrinking removed" in caplog.text
    # the removed ops' weights are left alone by the meta-optimiser
    frozen = straight._frozen_weights
    assert frozen

    killed = make_trainer(tmp_path / "b", algorithm(), val_every=0)
    killed.sampler = DyingTasks(die_at=2 * 4 + 1)  # dies inside meta-step 5; last checkpoint at 3
    with pytest.raises(Killed):
        killed.fit()
    state = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert state["step"] == 3 and sum(map(sum, state["op_mask"]["normal"])) < 20

    resumed = make_trainer(tmp_path / "b", algorithm(), val_every=0)
    resumed.resume(tmp_path / "b" / "checkpoints" / "last.ckpt")
    resumed.fit()
    for name, p in straight.weights.items():
        assert torch.equal(p, resumed.weights[name]), name
    for name, p in straight.alphas.items():
        assert torch.equal(p, resumed.alphas[name]), name
    assert straight.op_mask == resumed.op_mask and straight.net.op_mask == resumed.net.op_mask
    assert straight.shrink_counts == resumed.shrink_counts
    assert [r["ops_kept"] for r in resumed.history] == kept
    assert [r["query_loss"] for r in straight.history] == [r["query_loss"] for r in resumed.history]
    # every task thread's replica got the mask
    assert all(n.op_mask == straight.op_mask for n in straight.pool.networks())
    straight.close(), killed.close(), resumed.close()


def test_a_checkpoint_without_a_mask_keeps_every_op_and_the_test_uses_the_best_mask(tmp_path):
    trainer = make_trainer(tmp_path, meta_steps=2, val_every=0)
    trainer.fit()
    state = trainer.state_dict()
    assert trainer.net.op_mask is not None
    old = {k: v for k, v in state.items() if k not in ("op_mask", "shrink_counts")}
    fresh = make_trainer(tmp_path / "old", meta_steps=2, val_every=0)
    fresh.load_state_dict(old)
    assert fresh.net.op_mask is None and fresh.op_mask == full_op_mask(fresh.search_space)
    assert fresh.shrink_counts == zero_counts(fresh.op_mask)
    seen = []
    trainer._evaluate = lambda *a, **k: seen.append(trainer.net.op_mask)  # what the test adapts in
    trainer.test()
    assert seen == [trainer.net.op_mask]
    trainer.close(), fresh.close()


def test_min_ops_must_leave_something_to_remove(tmp_path):
    with pytest.raises(ConfigError, match="trainer.shrink.min_ops=4"):
        make_trainer(tmp_path, shrink=dict(every=1, min_ops=4))


# ------------------------------------------------------------------------- command line
def run_cli(module, *args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_smoke_run_with_shrinking_and_adapt_loads_the_mask(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("metanas.cli", "experiment=smoke", "trainer.meta_steps=4", "trainer.val_every=2",
                   "trainer.n_val_tasks=2", "trainer.n_test_tasks=2", "trainer.shrink.every=2",
                   "trainer.shrink.patience=1", "trainer.shrink.ratio=0.999", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((run_dir / "train_log.csv").open()))
    kept = [float(r["ops_kept"]) for r in rows]
    assert kept[0] == 35 and kept[-1] < kept[0], kept
    assert "shrinking removed" in proc.stdout + proc.stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    model = load_meta_model(run_dir / "checkpoints" / "last.ckpt")
    assert model.net.op_mask == {k: tuple(map(tuple, v)) for k, v in state["op_mask"].items()}
    genotype = json.loads((run_dir / "genotype.json").read_text())
    assert genotype["reduce"]


def test_cli_refuses_a_bad_shrink_setting_with_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("metanas.cli", "experiment=smoke", "trainer.shrink.ratio=1.5", f"hydra.run.dir={run_dir}",
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.shrink.ratio=1.5" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.json").exists()


def test_load_meta_model_of_an_old_checkpoint_keeps_every_op(tmp_path):
    trainer = make_trainer(tmp_path, meta_steps=1, val_every=0, shrink={})
    trainer.fit()
    state = trainer.state_dict()
    old = {k: v for k, v in state.items() if k not in ("op_mask", "shrink_counts")}
    save_checkpoint(tmp_path / "old.ckpt", old)
    assert load_meta_model(tmp_path / "old.ckpt").net.op_mask is None
    masked = dict(state, op_mask={k: [[o != 1 for o in range(4)] for _ in v] for k, v in state["op_mask"].items()})
    save_checkpoint(tmp_path / "masked.ckpt", masked)
    model = load_meta_model(tmp_path / "masked.ckpt")
    assert model.net.op_mask["normal"][0] == (True, False, True, True)
    assert "skip_connect" not in model.genotype.to_json()
    trainer.close()

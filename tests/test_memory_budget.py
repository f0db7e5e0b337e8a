"""``trainer.memory_budget_gb``: it bounds the tasks in flight, never the results.

- a budget of about two tasks keeps at most two tasks in flight on four task threads
  (observed with a counter of concurrent calls of the per-task function);
- a budget below one task is a one-line ConfigError naming the key, the estimate and the fixes;
  bad values are refused when the config is built;
- the meta-parameters after meta-steps with a bound equal those without (float64, exactly),
  and equal a plain per-task loop written here;
- the vmap engine maps chunks of at most the bound (the per-task function is traced once per
  chunk) and gives the same meta-gradients.
"""

from __future__ import annotations

import functools
import math
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_task, tiny_space

from metanas.algorithms import MAML, Reptile
from metanas.engines import TaskPool
from metanas.errors import ConfigError
from metanas.inner import InnerLoopConfig, adapt
from metanas.memory import GB, check_budget, estimate_task_bytes
from metanas.search_space import SearchNetwork, init_alphas
from metanas.tasks import Task
from metanas.trainer import MetaTrainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INNER = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.2)


class Float64Tasks:
    n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

    def sample(self, split, rng):
        return make_task(int(rng.integers(1 << 30)), dtype=torch.float64)


class CountingReptile(Reptile):
    """Reptile whose per-task function records how many calls run at the same time."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lock = threading.Lock()
        self.now = self.most = self.calls = 0

    def task_terms(self, *args, **kwargs):
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.05)  # overlap: the other threads start their tasks meanwhile
            return super().task_terms(*args, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def _net():
    space = tiny_space()
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    alphas = {k: v.double() for k, v in init_alphas(space, generator=torch.Generator().manual_seed(0)).items()}
    return space, net, alphas


def _trainer(tmp_path, algorithm, **cfg):
    space, net, alphas = _net()
    opt = functools.partial(torch.optim.SGD, lr=0.5)
    settings = dict(meta_steps=2, meta_batch_size=4, val_every=0, n_val_tasks=1, ckpt_every=0,
                    n_test_tasks=1, progress=False, task_workers=4)
    settings.update(cfg)
    return MetaTrainer(net=net, alphas=alphas, sampler=Float64Tasks(), algorithm=algorithm, inner=INNER,
                       weights_optimizer=opt, alphas_optimizer=opt, search_space=space,
                       cfg=TrainerConfig(**settings), run_dir=tmp_path)


def _per_task_gb(second_order: bool = False) -> float:
    _, net, alphas = _net()
    task = make_task(123)
    return estimate_task_bytes(net, dict(net.named_parameters()), alphas, task, INNER, second_order) / GB


def test_a_budget_of_two_tasks_keeps_two_in_flight(tmp_path):
    budget = 2.5 * _per_task_gb()
    algo = CountingReptile(batching="threads")
    trainer = _trainer(tmp_path / "bounded", algo, memory_budget_gb=budget)
    try:
        trainer.meta_step()
        assert trainer.pool.memory_bound == 2 and trainer.pool.in_flight == 2
        assert algo.calls == 4 and algo.most == 2
    finally:
        trainer.close()
    # the counter does see concurrency: without a bound, more than two tasks overlap
    free = CountingReptile(batching="threads")
    trainer = _trainer(tmp_path / "free", free, memory_budget_gb=1000.0)
    try:
        trainer.meta_step()
        assert trainer.pool.in_flight == 4 and free.most > 2
    finally:
        trainer.close()


def test_a_budget_below_one_task_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path, Reptile(), memory_budget_gb=1e-9)
    try:
        with pytest.raises(ConfigError) as err:
            trainer.meta_step()
    finally:
        trainer.close()
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("trainer.memory_budget_gb=1e-09", "GiB", "inner.batch_size", "trainer.recompute_edges",
                 "larger trainer.memory_budget_gb"):
        assert part in msg
    estimate = float(msg.split("estimated at ")[1].split(" GiB")[0])
    assert estimate == pytest.approx(_per_task_gb(), rel=0.01)


@pytest.mark.parametrize("value", [0, -1.0, True, "8", math.inf, math.nan])
def test_bad_budgets_are_refused(value):
    with pytest.raises(ConfigError, match=r"trainer\.memory_budget_gb=.*positive number of GiB.*null"):
        TrainerConfig(memory_budget_gb=value)
    assert check_budget(None) is None and check_budget(2) == 2.0


def test_results_do_not_depend_on_the_bound(tmp_path):
    per_task = _per_task_gb()
    finals = []
    for name, budget in (("one", 1.5 * per_task), ("two", 2.5 * per_task), ("free", 1000.0)):
        trainer = _trainer(tmp_path / name, Reptile(batching="threads"), memory_budget_gb=budget)
        try:
            trainer.meta_step()
            trainer.meta_step()
            finals.append((trainer.pool.in_flight,
                           {k: v.detach().clone() for k, v in (*trainer.weights.items(), *trainer.alphas.items())}))
        finally:
            trainer.close()
    assert [n for n, _ in finals] == [1, 2, 4]
    for _, state in finals[1:]:
        for k, v in state.items():
            assert torch.equal(v, finals[0][1][k]), k
    # a plain loop written here: Reptile with SGD(lr=0.5) on the tasks the trainer draws
    _, net, alphas = _net()
    w = {k: v.detach().clone() for k, v in net.named_parameters()}
    a = {k: v.clone() for k, v in alphas.items()}
    rng = np.random.default_rng(0)
    for _ in range(2):
        tasks = [Float64Tasks().sample("train", rng) for _ in range(4)]
        adapted = [adapt(net, w, a, t.support_x, t.support_y, INNER) for t in tasks]
        w = {k: v + 0.5 * (sum(x.weights[k].detach() for x in adapted) / 4 - v) for k, v in w.items()}
        a = {k: v + 0.5 * (sum(x.alphas[k].detach() for x in adapted) / 4 - v) for k, v in a.items()}
    for k, v in {**w, **a}.items():
        torch.testing.assert_close(finals[0][1][k], v, rtol=1e-12, atol=1e-13, msg=k)


@pytest.mark.parametrize("algo_cls", [Reptile, MAML], ids=lambda c: c.__name__)
def test_vmap_chunks_are_bounded(algo_cls):
    _, net, alphas = _net()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    alphas = {k: (v * 300).requires_grad_(True) for k, v in alphas.items()}
    tasks = [make_task(20 + i) for i in range(3)]
    results, traced = {}, {}
    for bound in (None, 2):
        algo = algo_cls(batching="vmap")
        calls = []
        original = algo.task_terms
        algo.task_terms = lambda *args, **kw: (calls.append(1), original(*args, **kw))[1]
        pool = TaskPool(net, 1, memory_bound=bound)
        results[bound] = algo.meta_gradients(net, weights, alphas, tasks, INNER, pool=pool)
        traced[bound] = len(calls)
    # vmap traces the per-task function once per chunk: 1 chunk, then ceil(3/2) = 2
    assert traced == {None: 1, 2: 2}
    # an explicit vmap_chunk_size is lowered, not raised, by the bound
    algo = algo_cls(batching="vmap", vmap_chunk_size=1)
    calls = []
    original = algo.task_terms
    algo.task_terms = lambda *args, **kw: (calls.append(1), original(*args, **kw))[1]
    algo.meta_gradients(net, weights, alphas, tasks, INNER, pool=TaskPool(net, 1, memory_bound=4))
    assert len(calls) == 3
    # the same meta-gradients in every chunking, and those of a plain loop
    loop = algo_cls(batching="loop").meta_gradients(net, weights, alphas, tasks, INNER)
    for bound, got in results.items():
        for group, ref in ((got.weights, loop.weights), (got.alphas, loop.alphas)):
            for k in ref:
                torch.testing.assert_close(group[k], ref[k], rtol=1e-10, atol=1e-12, msg=f"{bound} {k}")
        assert got.query_loss == pytest.approx(loop.query_loss, rel=1e-10)


def test_the_estimate_follows_what_the_inner_loop_keeps():
    from dataclasses import replace

    _, net, alphas = _net()
    weights = dict(net.named_parameters())
    t = make_task(5)  # 18 support images, 3 query images: the support pass dominates
    task = Task(torch.cat([t.support_x] * 3), torch.cat([t.support_y] * 3), t.query_x[:3], t.query_y[:3],
                t.classes)
    first = estimate_task_bytes(net, weights, alphas, task, INNER)
    second = estimate_task_bytes(net, weights, alphas, task, INNER, second_order=True)
    smaller_batch = estimate_task_bytes(net, weights, alphas, task, replace(INNER, batch_size=2))
    net.recompute_cells = True
    try:
        recomputed = estimate_task_bytes(net, weights, alphas, task, INNER)
    finally:
        net.recompute_cells = False
    net.recompute_edges = True
    try:
        per_edge = estimate_task_bytes(net, weights, alphas, task, INNER)
    finally:
        net.recompute_edges = False
    assert second > 2 * first  # every update's graph is kept
    assert smaller_batch < first / 2  # a mini-batch of 2 of the 18 images
    assert recomputed < first
    assert per_edge < recomputed  # one edge's ops are rebuilt at a time, not a whole cell's


@pytest.mark.parametrize("key", ["recompute_cells", "recompute_edges"])
def test_recompute_settings_reach_the_network_and_its_task_thread_replicas(tmp_path, key):
    trainer = _trainer(tmp_path, Reptile(batching="threads"), **{key: True})
    try:
        replicas = trainer.pool.networks()
        assert len(replicas) == 5 and replicas[0] is trainer.net
        assert all(getattr(n, key) for n in replicas)
        other = "recompute_edges" if key == "recompute_cells" else "recompute_cells"
        assert not any(getattr(n, other) for n in replicas)
    finally:
        trainer.close()


def test_recomputing_both_per_cell_and_per_edge_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"recompute_cells=true and trainer\.recompute_edges=true: set one"):
        _trainer(tmp_path, Reptile(), recompute_cells=True, recompute_edges=True)

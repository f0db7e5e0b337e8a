"""The inner loop, second-order MAML and architecture diversity against independent references.

Each reference is written here, from the documented behaviour, without the library's
inner-loop, optimiser, temperature-schedule or meta-gradient code, so these tests keep their
meaning when ``metanas.inner``, ``metanas.batched``, ``metanas.algorithms`` and
``metanas.evaluate`` are rewritten. Only the supernet's own forward
(``net(x, alphas, temperature)``, called through ``torch.func.functional_call``) is shared.

- Annealed inner loop (SGD and Adam): a plain-autograd loop with its own linear schedule
  ``T(i) = start + (end - start) * i / steps`` (step ``s`` at ``T(s)``, read-out at
  ``T(steps)``), SGD as ``p - lr * g`` and Adam as ``torch.optim.Adam`` on cloned leaves with
  separate learning rates for weights and alphas. Compared with ``adapt`` (adapted tensors,
  support losses, read-out temperature), ``predict``, and the first-order meta-gradients of
  FOMAML and Reptile with the default engine and with ``vmap``.
- Second-order MAML with soft pruning, linear annealing and Adam at its default ``eps``:
  `higher` (its own differentiable Adam) on a module bundling weights and alphas whose
  forward takes the temperature, fed the same per-step temperature. The network applies the
  same pruning for both. higher adds ``eps`` to ``sqrt(v)`` before the bias correction,
  torch.optim.Adam (and metanas) after it, so higher is given ``eps * sqrt(1 - beta2 ** t)``
  at step ``t``, which makes the two updates the same function. Default engine and ``vmap``.
- Architecture diversity: alphas planted so that the DARTS rule gives genotypes written out
  here by hand, and the four diversity numbers counted by hand; and through ``evaluate``,
  alphas planted so that the derived architecture flips between the first temperature and the
  read-out temperature (alphas frozen by ``lr_alphas=0``), so every task genotype must be the
  hand-written read-out one.
"""

from __future__ import annotations

import math

import higher
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import make_task, tiny_space
from test_meta_gradients import _Bundled
from metanas.algorithms import FOMAML, MAML, Reptile
from metanas.evaluate import diversity, evaluate
from metanas.inner import InnerLoopConfig, adapt, predict
from metanas.search_space import Genotype, SearchNetwork, derive_genotype, init_alphas

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- the reference inner loop -------------------------------------------------------------

T_START, T_END, STEPS = 2.0, 0.25, 3
BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, written out
LR = {"sgd": (0.1, 0.5), "adam": (0.01, 0.05)}  # (weights, alphas)


def ref_temperature(i: int, steps: int, start: float = T_START, end: float = T_END) -> float:
    """Linear annealing: step ``i`` of ``steps``; ``i == steps`` is the read-out."""
    return start + (end - start) * i / steps


def run(net, w, a, x, temperature):
    return functional_call(net, {**w}, (x, a), {"temperature": temperature})


def ref_adapt(net, weights, alphas, x, y, optimizer, steps=STEPS):
    """Adapted (weights, alphas) as fresh leaves and the support loss before each step."""
    lr_w, lr_a = LR[optimizer]
    w = {k: v.detach().clone().requires_grad_(True) for k, v in weights.items()}
    a = {k: v.detach().clone().requires_grad_(True) for k, v in alphas.items()}
    params = list(w.values()) + list(a.values())
    opt = torch.optim.Adam([{"params": list(w.values()), "lr": lr_w},
                            {"params": list(a.values()), "lr": lr_a}], betas=BETAS, eps=EPS)
    losses = []
    for s in range(steps):
        loss = F.cross_entropy(run(net, w, a, x, ref_temperature(s, steps)), y)
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, params)
        if optimizer == "sgd":
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= (lr_w if any(p is q for q in w.values()) else lr_a) * g
        else:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    return w, a, losses


def inner_cfg(optimizer: str) -> InnerLoopConfig:
    lr_w, lr_a = LR[optimizer]
    return InnerLoopConfig(steps=STEPS, lr_weights=lr_w, lr_alphas=lr_a, optimizer=optimizer,
                           temperature_start=T_START, temperature_end=T_END,
                           temperature_schedule="linear")


def _close(ours, ref, rtol=1e-9, atol=1e-12):
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_adapt_follows_an_independent_annealed_inner_loop(tiny, optimizer):
    net, weights, alphas, _ = tiny
    task = make_task(31)
    adapted = adapt(net, weights, alphas, task.support_x, task.support_y, inner_cfg(optimizer))
    w, a, losses = ref_adapt(net, weights, alphas, task.support_x, task.support_y, optimizer)
    _close(adapted.weights, w)
    _close(adapted.alphas, a)
    assert [float(v) for v in adapted.support_losses] == pytest.approx(losses, rel=1e-10)
    with torch.no_grad():
        ours = predict(net, adapted, task.query_x)
        ref = run(net, w, a, task.query_x, ref_temperature(STEPS, STEPS))
        at_start = run(net, w, a, task.query_x, ref_temperature(0, STEPS))
    # the schedule matters at this size: reading out at the wrong end would be visible
    assert (ref - at_start).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert adapted.temperature == pytest.approx(T_END)


@pytest.mark.parametrize("batching", ["auto", "vmap"])
@pytest.mark.parametrize("algo_cls", [FOMAML, Reptile], ids=lambda c: c.__name__)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_first_order_meta_gradients_follow_the_independent_loop(tiny, tasks, optimizer, algo_cls,
                                                                batching):
    """FOMAML: query gradient at the adapted tensors, read out at T(steps). Reptile: the mean
    displacement meta - adapted; both report the mean query loss at T(steps)."""
    net, weights, alphas, _ = tiny
    ours = algo_cls(batching=batching).meta_gradients(net, weights, alphas, tasks,
                                                      inner_cfg(optimizer))
    ref_w = {k: torch.zeros_like(v) for k, v in weights.items()}
    ref_a = {k: torch.zeros_like(v) for k, v in alphas.items()}
    q_loss = s_loss = 0.0
    for task in tasks:
        w, a, losses = ref_adapt(net, weights, alphas, task.support_x, task.support_y, optimizer)
        q = F.cross_entropy(run(net, w, a, task.query_x, ref_temperature(STEPS, STEPS)),
                            task.query_y)
        if algo_cls is FOMAML:
            grads = torch.autograd.grad(q, list(w.values()) + list(a.values()))
            parts = dict(zip(list(w) + list(a), grads))
        else:
            parts = {k: (v - {**w, **a}[k]).detach() for k, v in {**weights, **alphas}.items()}
        for k, g in parts.items():
            (ref_w if k in ref_w else ref_a)[k] += g / len(tasks)
        q_loss += q.item() / len(tasks)
        s_loss += losses[0] / len(tasks)
    _close(ours.weights, ref_w)
    _close(ours.alphas, ref_a)
    assert ours.query_loss == pytest.approx(q_loss, rel=1e-9)
    assert ours.support_loss == pytest.approx(s_loss, rel=1e-9)


# --- second-order MAML vs higher, pruning + annealing + Adam(eps=1e-8) -------------------

PRUNE = 0.2
SO_START, SO_END, SO_STEPS = 1.5, 0.5, 3
SO_LR = {"sgd": (0.1, 0.3), "adam": (0.01, 0.05)}


def _pruned_net():
    """Tiny float64 supernet with pruning, and alphas of scale ~1 (some ops pruned)."""
    space = tiny_space(pairwise_input_alphas=True, prune_threshold=PRUNE)
    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    alphas = {k: (v.double() * 1000).requires_grad_(True)
              for k, v in init_alphas(space, generator=torch.Generator().manual_seed(3)).items()}
    return net, weights, alphas, space


def _ref_pruned(alpha, temperature):
    """Mask of the ops soft pruning removes, and the smallest distance of a weight from the
    cut (from the documented rule: softmax weight below min(threshold, row max))."""
    w = torch.softmax(alpha.detach() / temperature, dim=-1)
    cut = w.amax(dim=-1, keepdim=True).clamp(max=PRUNE)
    return w < cut, float((w - cut).abs()[w != w.amax(dim=-1, keepdim=True)].min())


def _higher_second_order(net, weights, alphas, tasks, optimizer):
    lr_w, lr_a = SO_LR[optimizer]
    model = _Bundled(net, weights, alphas)
    groups = [{"params": list(model.net.parameters()), "lr": lr_w},
              {"params": list(model.alphas.parameters()), "lr": lr_a}]
    opt = (torch.optim.SGD(groups) if optimizer == "sgd"
           else torch.optim.Adam(groups, betas=BETAS, eps=EPS))
    names_w = [n for n, _ in model.net.named_parameters()]
    names_a = list(model.alphas)
    leaves = list(model.net.parameters()) + [model.alphas[n] for n in names_a]
    total = {n: torch.zeros_like(p) for n, p in zip(names_w + names_a, leaves)}
    masks = []  # per task, per step: pruned-op masks of the alpha matrices
    for task in tasks:
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
            # an op skipped by pruning has a zero (not a missing) gradient: Adam's momentum
            # still moves it, as torch.optim.Adam would with a zero .grad
            def zeros_for_unused(grads):
                return [torch.zeros_like(p) if g is None else g
                        for p, g in zip(fmodel.fast_params, grads)]
            task_masks = []
            for s in range(SO_STEPS):
                t = ref_temperature(s, SO_STEPS, SO_START, SO_END)
                current = dict(zip(names_a, list(fmodel.fast_params)[len(names_w):]))
                task_masks.append({k: _ref_pruned(current[k], t)
                                   for k in ("normal", "reduce")})
                loss = F.cross_entropy(fmodel(task.support_x, t), task.support_y)
                # higher: p - lr * sqrt(c2) / c1 * m / (sqrt(v) + eps); torch.optim.Adam:
                # p - lr * (m / c1) / (sqrt(v / c2) + eps); equal with eps * sqrt(c2) given to
                # higher (without it the meta-gradients here differ by up to 0.9)
                override = (None if optimizer == "sgd"
                            else {"eps": [EPS * math.sqrt(1 - BETAS[1] ** (s + 1))] * 2})
                diffopt.step(loss, override=override, grad_callback=zeros_for_unused)
            t = ref_temperature(SO_STEPS, SO_STEPS, SO_START, SO_END)
            current = dict(zip(names_a, list(fmodel.fast_params)[len(names_w):]))
            task_masks.append({k: _ref_pruned(current[k], t) for k in ("normal", "reduce")})
            q = F.cross_entropy(fmodel(task.query_x, t), task.query_y) / len(tasks)
            grads = torch.autograd.grad(q, leaves, allow_unused=True)
        for n, g in zip(names_w + names_a, grads):
            if g is not None:
                total[n] += g
        masks.append(task_masks)
    return ({n: total[n] for n in names_w}, {n: total[n] for n in names_a}, masks)


@pytest.mark.parametrize("batching", ["auto", "vmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_second_order_maml_matches_higher_with_pruning_and_annealing(tasks, optimizer, batching):
    net, weights, alphas, _ = _pruned_net()
    lr_w, lr_a = SO_LR[optimizer]
    cfg = InnerLoopConfig(steps=SO_STEPS, lr_weights=lr_w, lr_alphas=lr_a, optimizer=optimizer,
                          temperature_start=SO_START, temperature_end=SO_END,
                          temperature_schedule="linear")  # betas, eps: the defaults
    ours = MAML(batching=batching).meta_gradients(net, weights, alphas, tasks, cfg)
    ref_w, ref_a, masks = _higher_second_order(net, weights, alphas, tasks, optimizer)
    # the setting is the intended one: some ops pruned at every step, more as the temperature
    # falls, and no softmax weight within round-off of the cut (same pruning for both)
    for task_masks in masks:
        counts = [sum(int(m.sum()) for m, _ in step.values()) for step in task_masks]
        assert counts[0] > 0 and counts[-1] > counts[0], counts
        assert min(margin for step in task_masks for _, margin in step.values()) > 1e-4
    always = torch.stack([step["normal"][0] for t in masks for step in t]).all(dim=0)
    assert always.any() and (ref_a["normal"][always] == 0).all()  # never used: no gradient
    assert ref_a["normal"].abs().max() > 1e-3 and ref_a["normal_edges"].abs().max() > 1e-3
    _close(ours.alphas, ref_a)
    _close(ours.weights, ref_w)


# --- architecture diversity on planted alphas ---------------------------------------------

CONV, SKIP, AVG, SEP = range(4)  # tiny_space's op order
OPS = ("conv_3x3", "skip_connect", "avg_pool_3x3", "sep_conv_3x3")


def _planted(normal_ops, reduce_ops, normal_strength=(3, 3, 3, 3, 1),
             reduce_strength=(3, 3, 3, 3, 1)):
    """Alphas (no pairwise logits) where edge ``e`` has op ``ops[e]`` at logit
    ``strength[e]`` and every other op at 0 (a larger logit -> a stronger edge)."""
    out = {}
    for kind, ops, strength in (("normal", normal_ops, normal_strength),
                                ("reduce", reduce_ops, reduce_strength)):
        a = torch.zeros(5, 4, dtype=torch.float64)
        for e, (o, s) in enumerate(zip(ops, strength)):
            a[e, o] = s
        out[kind] = a
    return out


def test_diversity_matches_a_hand_count_on_planted_alphas():
    space = tiny_space()  # 2 nodes: edges 0,1 -> node 0 (inputs 0,1); 2,3,4 -> node 1 (0,1,2)
    assert space.ops == OPS and space.n_edges == 5
    meta = _planted([CONV] * 5, [SKIP] * 5)
    scaled = {k: 2.0 * v + 0.01 for k, v in meta.items()}  # other alphas, same architecture
    a = _planted([CONV, SEP, CONV, CONV, CONV], [SKIP] * 5)  # normal node 0, input 1 -> sep
    b = _planted([AVG, CONV, CONV, CONV, CONV], [SKIP, SKIP, SKIP, SKIP, AVG],
                 reduce_strength=(3, 3, 3, 0.5, 5))  # normal 0<-0 avg; reduce node 1: 0, 2(avg)
    per_task = [meta, meta, scaled, a, a, b]

    g_meta = Genotype(normal=((("conv_3x3", 0), ("conv_3x3", 1)), (("conv_3x3", 0), ("conv_3x3", 1))),
                      normal_concat=(2, 3),
                      reduce=((("skip_connect", 0), ("skip_connect", 1)),
                              (("skip_connect", 0), ("skip_connect", 1))),
                      reduce_concat=(2, 3))
    g_a = Genotype(normal=((("conv_3x3", 0), ("sep_conv_3x3", 1)), (("conv_3x3", 0), ("conv_3x3", 1))),
                   normal_concat=(2, 3), reduce=g_meta.reduce, reduce_concat=(2, 3))
    g_b = Genotype(normal=((("avg_pool_3x3", 0), ("conv_3x3", 1)), (("conv_3x3", 0), ("conv_3x3", 1))),
                   normal_concat=(2, 3),
                   reduce=((("skip_connect", 0), ("skip_connect", 1)),
                           (("skip_connect", 0), ("avg_pool_3x3", 2))),
                   reduce_concat=(2, 3))
    genotypes = [derive_genotype(al, space) for al in per_task]
    assert genotypes == [g_meta, g_meta, g_meta, g_a, g_a, g_b]
    reference = derive_genotype(meta, space)
    assert reference == g_meta

    # by hand: 3 distinct genotypes; the meta one is the most common (3 of 6 tasks); 3 of 6
    # changed; 8 slots (2 cells x 2 nodes x 2 inputs): a differs in 1, b in 2
    d = diversity(genotypes, reference)
    assert d["unique_genotypes"] == 3
    assert d["most_common_share"] == pytest.approx(3 / 6)
    assert d["changed_share"] == pytest.approx(3 / 6)
    assert d["mean_distance_to_meta"] == pytest.approx((0 + 0 + 0 + 1 / 8 + 1 / 8 + 2 / 8) / 6)
    # against b as the reference: a differs from b in 3 slots, meta in 2
    d = diversity(genotypes, g_b)
    assert d["changed_share"] == pytest.approx(5 / 6)
    assert d["mean_distance_to_meta"] == pytest.approx((3 * 2 / 8 + 2 * 3 / 8 + 0) / 6)
    # without a reference only the counts
    assert diversity(genotypes[3:], None) == {"unique_genotypes": 2, "most_common_share": 2 / 3}


class _Tasks:
    """A sampler of the conftest's float64 tasks, seeded from the rng it is given."""

    def sample(self, split, rng):
        return make_task(int(rng.integers(1 << 30)))


def test_evaluate_derives_task_architectures_at_the_read_out_temperature():
    """Frozen alphas (lr_alphas=0) planted so that node 1 of the normal cell keeps inputs
    (0, 2) at T=1 and (1, 2) at T=0.25: every task must report the read-out architecture."""
    space = tiny_space()
    alphas = {
        # node 1's edges: from 0 [2, 1.9, 0, 0], from 1 [0.5, 0, 0, 0], from 2 [1.2, 0, 0, 0].
        # max softmax weight at T=1: 0.46, 0.35, 0.52 -> inputs 0, 2;
        #                   at T=0.25: 0.60, 0.71, 0.98 -> inputs 1, 2.
        "normal": torch.tensor([[3, 0, 0, 0], [3, 0, 0, 0], [2, 1.9, 0, 0], [0.5, 0, 0, 0],
                                [1.2, 0, 0, 0]], dtype=torch.float64),
        "reduce": _planted([SKIP] * 5, [SKIP] * 5)["reduce"],
    }
    at = {T: derive_genotype(alphas, space, temperature=T) for T in (1.0, 0.25)}
    node1 = {T: tuple(j for _, j in g.normal[1]) for T, g in at.items()}
    assert node1 == {1.0: (0, 2), 0.25: (1, 2)}  # the planted flip
    read_out = Genotype(
        normal=((("conv_3x3", 0), ("conv_3x3", 1)), (("conv_3x3", 1), ("conv_3x3", 2))),
        normal_concat=(2, 3),
        reduce=((("skip_connect", 0), ("skip_connect", 1)), (("skip_connect", 0), ("skip_connect", 1))),
        reduce_concat=(2, 3))
    assert at[0.25] == read_out

    torch.manual_seed(0)
    net = SearchNetwork(space).double()
    weights = dict(net.named_parameters())
    inner = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.0, temperature_start=1.0,
                            temperature_end=0.25, temperature_schedule="linear")
    result = evaluate(net, weights, alphas, _Tasks(), "test", 3, inner, space,
                      np.random.default_rng(0))
    assert result.genotypes == (read_out,) * 3
    assert result.diversity["unique_genotypes"] == 1
    assert result.diversity["most_common_share"] == 1.0
    # frozen alphas change no architecture: the meta-architecture is derived at the same
    # (read-out) temperature as the tasks' ones
    assert result.diversity["changed_share"] == 0.0
    assert result.diversity["mean_distance_to_meta"] == 0.0

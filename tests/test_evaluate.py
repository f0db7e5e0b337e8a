"""Meta-test statistics, the two batch-statistics protocols, and architecture diversity."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_task
from metanas.evaluate import diversity, evaluate, mean_ci95, predict_query
from metanas.inner import InnerLoopConfig, adapt, predict
from metanas.engines import TaskPool
from metanas.search_space import Genotype
from test_trainer import RandomTasks


def test_mean_ci95_matches_the_textbook_formula():
    values = [0.8, 0.9, 1.0, 0.7, 0.95]
    mean, ci = mean_ci95(values)
    sd = math.sqrt(sum((v - 0.87) ** 2 for v in values) / 4)
    assert mean == pytest.approx(0.87)
    assert ci == pytest.approx(1.96 * sd / math.sqrt(5))
    assert mean_ci95([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_ci95([])


def test_non_transductive_prediction_sees_only_support_and_one_query(tiny):
    net, weights, alphas, _ = tiny
    task = make_task(21)
    adapted = adapt(net, weights, alphas, task.support_x, task.support_y, InnerLoopConfig(steps=1))
    with torch.no_grad():
        ours = predict_query(net, adapted, task, transductive=False)
        loop = torch.stack([
            predict(net, adapted, torch.cat([task.support_x, q[None]]))[-1] for q in task.query_x
        ])
        transductive = predict_query(net, adapted, task, transductive=True)
    torch.testing.assert_close(ours, loop, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(transductive, predict(net, adapted, task.query_x))
    assert not torch.allclose(ours, transductive)  # batch statistics differ between protocols
    # a query's non-transductive prediction does not depend on the other queries
    changed = task.query_x.clone()
    changed[1:] = 0.0
    again = predict_query(net, adapted, replace(task, query_x=changed), transductive=False)
    torch.testing.assert_close(again[0], ours[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transductive", [True, False])
def test_evaluate_reports_accuracy_ci_and_genotypes(tiny, transductive):
    net, weights, alphas, space = tiny
    net = net.float()
    weights = {k: v.float() for k, v in weights.items()}
    alphas = {k: v.float() for k, v in alphas.items()}
    result = evaluate(net, weights, alphas, RandomTasks(), "test", 4, InnerLoopConfig(steps=2),
                      space, np.random.default_rng(0), transductive=transductive)
    assert result.n_tasks == 4 and len(result.accuracies) == 4 and len(result.genotypes) == 4
    assert result.accuracy == pytest.approx(np.mean(result.accuracies))
    assert result.ci95 == pytest.approx(mean_ci95(result.accuracies)[1])
    assert {"unique_genotypes", "most_common_share", "mean_distance_to_meta"} <= set(result.diversity)
    again = evaluate(net, weights, alphas, RandomTasks(), "test", 4, InnerLoopConfig(steps=2),
                     space, np.random.default_rng(0), transductive=transductive)
    assert again.accuracies == result.accuracies  # same seed, same tasks, same numbers
    with TaskPool(net, 2) as pool:
        threaded = evaluate(net, weights, alphas, RandomTasks(), "test", 4, InnerLoopConfig(steps=2),
                            space, np.random.default_rng(0), transductive=transductive, pool=pool)
    assert threaded.accuracies == result.accuracies
    assert threaded.genotypes == result.genotypes


def test_diversity_counts_distinct_architectures():
    a = Genotype(normal=((("conv_3x3", 0), ("skip_connect", 1)),), normal_concat=(2,))
    b = Genotype(normal=((("conv_3x3", 0), ("avg_pool_3x3", 1)),), normal_concat=(2,))
    d = diversity([a, a, b, a], reference=a)
    assert d["unique_genotypes"] == 2
    assert d["most_common_share"] == 0.75
    assert d["changed_share"] == 0.25
    assert d["mean_distance_to_meta"] == pytest.approx(0.5 / 4)


def _float_tiny(tiny):
    net, weights, alphas, space = tiny
    return (net.float(), {k: v.float() for k, v in weights.items()},
            {k: v.float() for k, v in alphas.items()}, space)


def test_frozen_alpha_comparison_runs_the_same_tasks(tiny):
    """extras[FROZEN] is each drawn task adapted with frozen alphas: recomputed here by hand."""
    from metanas.evaluate import FROZEN

    net, weights, alphas, space = _float_tiny(tiny)
    inner = InnerLoopConfig(steps=2, lr_weights=0.1, lr_alphas=0.5)
    result = evaluate(net, weights, alphas, RandomTasks(), "test", 4, inner, space,
                      np.random.default_rng(3), compare_frozen=True)
    rng = np.random.default_rng(3)
    by_hand = []
    for _ in range(4):
        task = RandomTasks().sample("test", rng)
        frozen = adapt(net, weights, alphas, task.support_x, task.support_y, inner, adapt_alphas=False)
        with torch.no_grad():
            logits = predict(net, frozen, task.query_x)
        by_hand.append(float((logits.argmax(-1) == task.query_y).float().mean()))
    assert list(result.extras[FROZEN]) == by_hand
    gain, ci = result.architecture_gain()
    diffs = [a - f for a, f in zip(result.accuracies, by_hand)]
    assert gain == pytest.approx(np.mean(diffs)) and ci == pytest.approx(mean_ci95(diffs)[1])
    # without alpha adaptation both runs are one and the same: a gain of exactly zero
    still = evaluate(net, weights, alphas, RandomTasks(), "test", 4, replace(inner, lr_alphas=0.0),
                     space, np.random.default_rng(3), compare_frozen=True)
    assert still.architecture_gain() == (0.0, 0.0)


def test_noise_baseline_has_the_adaptations_size(tiny):
    """Zero displacement gives a noise baseline identical to the meta-architecture."""
    net, weights, alphas, space = _float_tiny(tiny)
    frozen = evaluate(net, weights, alphas, RandomTasks(), "test", 3,
                      InnerLoopConfig(steps=1, lr_alphas=0.0), space, np.random.default_rng(0))
    assert frozen.diversity["mean_alpha_displacement"] == 0.0
    assert frozen.diversity["noise_changed_share"] == 0.0
    moved = evaluate(net, weights, alphas, RandomTasks(), "test", 3,
                     InnerLoopConfig(steps=3, lr_alphas=50.0), space, np.random.default_rng(0))
    assert moved.diversity["mean_alpha_displacement"] > 0.1
    # noise of that size moves genotypes too: the baseline is not trivially zero
    assert moved.diversity["noise_mean_distance_to_meta"] > 0

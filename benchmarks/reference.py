"""The baseline: a meta-step with the structure of the MetaNAS reference implementation.

For every task of the meta-batch the meta-model (supernet weights and alphas as module
parameters) is deep-copied, the copy is trained on the support set with ``torch.optim.SGD``
or ``Adam`` (whole-support steps, or epochs of shuffled mini-batches: ``inner.batch_size``),
and its Reptile displacement or its query-loss gradient (first-order MAML) is accumulated into
the meta-model's ``.grad``. Every op of every edge is computed (a zero-weight op is multiplied
by zero) and the pools run in NCHW, as in the reference. Second-order MAML cannot be written
on deep copies (the copy's optimiser steps are not differentiable), so its baseline is the
plain per-task loop of :func:`metanas.inner.adapt` without threads.

Written for the benchmark from the description in Elsken et al. 2020 and the structure of a
deep-copy-per-task meta-learner; no code was taken from the reference implementation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from metanas.tasks import Task
from torch import nn

from metanas.inner import InnerLoopConfig
from metanas.search_space import SearchNetwork
from metanas.search_space.ops import PoolBN


def plain_ops(net: SearchNetwork) -> SearchNetwork:
    """Turn off the supernet's fast paths (pruned-op skipping, channels-last pools) in place."""
    net.skip_pruned_ops = False
    for m in net.modules():
        if isinstance(m, PoolBN):
            m.channels_last_on_cpu = False
    return net


class Bundled(nn.Module):
    """Supernet and alphas as one module (the reference keeps alphas as module parameters)."""

    def __init__(self, net: SearchNetwork, alphas: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.alphas = nn.ParameterDict({k: nn.Parameter(v.detach().clone()) for k, v in alphas.items()})

    def forward(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.net(x, dict(self.alphas), temperature)


def _inner_train(model: Bundled, task: Task, inner: InnerLoopConfig, adapt_alphas: bool) -> None:
    """Train the task copy with ``torch.optim`` on the support set.

    Without ``inner.batch_size``: ``inner.steps`` updates on the whole support set. With it:
    ``inner.steps`` epochs, each one pass over the support set in shuffled mini-batches of
    ``batch_size`` images (the reference's task optimiser: 5 epochs of 20-image batches),
    the temperature following the epoch; the shuffles are those of
    :meth:`metanas.inner.InnerLoopConfig.batches`, so that both sides see the same batches.
    """
    groups = [{"params": list(model.net.parameters()), "lr": inner.lr_weights}]
    if adapt_alphas:
        groups.append({"params": list(model.alphas.parameters()), "lr": inner.lr_alphas})
    opt = (torch.optim.SGD(groups) if inner.optimizer == "sgd"
           else torch.optim.Adam(groups, betas=inner.betas, eps=inner.eps))
    n = task.support_x.shape[0]
    for epoch, batches in enumerate(inner.batches(n)):
        for index in batches:
            x, y = (task.support_x, task.support_y) if index is None else (task.support_x[index], task.support_y[index])
            opt.zero_grad()
            F.cross_entropy(model(x, inner.temperature(epoch)), y).backward()
            opt.step()


def reference_meta_step(
    model: Bundled, tasks: Sequence[Task], inner: InnerLoopConfig, algorithm: str,
    adapt_alphas: bool = True,
) -> float:
    """Accumulate the meta-gradient of ``tasks`` into ``model``'s ``.grad``; returns the query accuracy.

    Args:
        model: the meta-model.
        tasks: the meta-batch.
        inner: inner-loop settings.
        algorithm: ``reptile`` or ``fomaml``.
        adapt_alphas: train the alphas in the inner loop too.
    """
    meta = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in meta.items()}
    acc = 0.0
    for task in tasks:
        task_model = copy.deepcopy(model)
        _inner_train(task_model, task, inner, adapt_alphas)
        temperature = inner.temperature(inner.steps)
        if algorithm == "reptile":
            with torch.no_grad():
                logits = task_model(task.query_x, temperature)
                for n, p in task_model.named_parameters():
                    total[n] += (meta[n] - p) / len(tasks)
        elif algorithm == "fomaml":
            task_model.zero_grad()
            logits = task_model(task.query_x, temperature)
            F.cross_entropy(logits, task.query_y).backward()
            for n, p in task_model.named_parameters():
                if p.grad is not None:
                    total[n] += p.grad / len(tasks)
        else:
            raise ValueError(f"the deep-copy baseline has no {algorithm!r}; use reptile or fomaml")
        acc += float((logits.argmax(-1) == task.query_y).float().mean()) / len(tasks)
    for n, p in meta.items():
        p.grad = total[n]
    return acc


def reference_adapt(model: Bundled, task: Task, inner: InnerLoopConfig) -> float:
    """Meta-test adaptation of one task on a deep copy; returns its query accuracy."""
    task_model = copy.deepcopy(model)
    _inner_train(task_model, task, inner, True)
    with torch.no_grad():
        logits = task_model(task.query_x, inner.temperature(inner.steps))
    return float((logits.argmax(-1) == task.query_y).float().mean())

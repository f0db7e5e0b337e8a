"""Stateless use of a network: its weights and the alphas are explicit dictionaries.

The meta-model is never mutated during task adaptation. Instead the weights are taken out of
the module once (:func:`weights_of`) and every forward pass receives the (possibly adapted)
weights and alphas explicitly through :func:`torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


def weights_of(net: nn.Module) -> Params:
    """Return the network's trainable weights by name (the live ``nn.Parameter`` objects)."""
    return dict(net.named_parameters())


def forward(
    net: nn.Module,
    weights: Mapping[str, Tensor],
    alphas: Mapping[str, Tensor],
    x: Tensor,
    temperature: float = 1.0,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Run ``net(x, alphas, temperature)`` with ``weights`` in place of the module's own.

    Args:
        net: a network whose ``forward(x, alphas, temperature)`` returns logits.
        weights: name -> tensor for every parameter of ``net``.
        alphas: architecture parameters, name -> tensor (see ``alpha_shapes``).
        x: inputs, shape (B, C, H, W).
        temperature: softmax temperature of the alpha normaliser.
        buffers: name -> tensor for the module's buffers, if it has any.

    Returns:
        Logits, shape (B, n_classes).
    """
    tensors = dict(weights) if not buffers else {**buffers, **weights}
    return functional_call(net, tensors, (x, alphas), {"temperature": temperature}, strict=True)


def detached(tensors: Mapping[str, Tensor], requires_grad: bool = False) -> Params:
    """Copies of ``tensors`` cut from the autograd graph, optionally as new leaves with grad."""
    return {k: v.detach().requires_grad_(requires_grad) for k, v in tensors.items()}


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of rows of ``logits`` (B, N) whose argmax equals ``y`` (B,); a 0-dim tensor."""
    return (logits.argmax(dim=-1) == y).float().mean()


__all__ = ["Params", "accuracy", "detached", "forward", "weights_of"]

"""Fixed-architecture baseline: the conv-4 network of few-shot learning.

Four blocks of ``conv3x3 -> BatchNorm -> ReLU -> 2x2 max-pool`` and a linear classifier on the
flattened (globally averaged) features (Vinyals et al., "Matching Networks", NeurIPS 2016;
Finn et al., "Model-Agnostic Meta-Learning", ICML 2017, Sec. 5.2). It has no architecture
parameters: it goes through the same meta-training (:class:`metanas.trainer.MetaTrainer` with
an empty alpha dict) and evaluation as the supernet, so the two can be compared on equal
terms.

Like the supernet (DARTS search convention), BatchNorm has ``affine=False`` and no running
statistics: it normalises with the statistics of the batch it is given, and the network holds
weights only, no buffers. The default of 64 filters is Finn et al.'s Omniglot setting (they
used 32 on miniImageNet); 48 filters give about 63k weights, close to the ~52k of a task
network derived from the ``small`` supernet preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["Conv4", "Conv4Config"]


@dataclass(frozen=True)
class Conv4Config:
    """Hyper-parameters of :class:`Conv4`.

    Attributes:
        in_channels: image channels.
        n_classes: logits (``n_way``).
        channels: filters of every conv layer.
        n_blocks: conv blocks (4 in the literature).
    """

    in_channels: int = 1
    n_classes: int = 5
    channels: int = 64
    n_blocks: int = 4

    def __post_init__(self) -> None:
        for name in ("in_channels", "n_classes", "channels", "n_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"conv4.{name} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, stored in checkpoints (tagged with ``model: conv4``)."""
        return {"model": "conv4", **asdict(self)}


class Conv4(nn.Module):
    """conv-4: ``n_blocks x [conv3x3, BN(affine=False), ReLU, maxpool 2]`` + linear.

    ``forward(x, alphas, temperature)`` has the supernet's signature so that the inner loop
    and the meta-algorithms treat both alike; ``alphas`` must be empty.
    """

    def __init__(self, cfg: Conv4Config) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for _ in range(cfg.n_blocks):
            layers += [
                nn.Conv2d(c_in, cfg.channels, 3, padding=1),
                nn.BatchNorm2d(cfg.channels, affine=False, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            c_in = cfg.channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.channels, cfg.n_classes)

    def forward(
        self, x: Tensor, alphas: Mapping[str, Tensor] | None = None, temperature: float = 1.0
    ) -> Tensor:
        """``x``: ``(B, in_channels, H, W)`` -> logits ``(B, n_classes)``.

        Raises:
            ConfigError: wrong input channels, or non-empty ``alphas``.
        """
        if alphas:
            raise ConfigError("Conv4 has no architecture parameters; pass an empty alpha dict")
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ConfigError(
                f"input has shape {tuple(x.shape)}, expected (B, {self.cfg.in_channels}, H, W)"
            )
        h = self.features(x)
        return self.classifier(torch.flatten(h.mean(dim=(2, 3)), 1))

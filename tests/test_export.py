"""Export of adapted task networks (TorchScript, ONNX, FLOPs) and the conv-4 baseline."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import make_task, tiny_space
from torch import nn
from torch.func import functional_call

from metanas.algorithms import FOMAML
from metanas.baselines import Conv4, Conv4Config
from metanas.errors import ConfigError
from metanas.evaluate import evaluate
from metanas.export import (
    BatchStatNorm,
    StandaloneClassifier,
    count_parameters,
    export_onnx,
    export_torchscript,
    flops_per_image,
    load_torchscript,
    replace_batch_norms,
)
from metanas.inner import InnerLoopConfig, adapt
from metanas.search_space import (
    DiscreteNetwork,
    SearchNetwork,
    derive_genotype,
    init_alphas,
)
from metanas.trainer import MetaTrainer, TrainerConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def discrete():
    """A discrete task network inheriting task-adapted supernet weights (float32)."""
    space = tiny_space(in_channels=3)
    torch.manual_seed(0)
    net = SearchNetwork(space)
    alphas = init_alphas(space, generator=torch.Generator().manual_seed(1))
    x = torch.randn(6, 3, 8, 8)
    adapted = adapt(net, dict(net.named_parameters()), alphas, x, torch.arange(3).repeat(2),
                    InnerLoopConfig(steps=2))
    genotype = derive_genotype(adapted.alphas, space)
    return DiscreteNetwork.from_supernet(genotype, space, adapted.weights).eval()


def test_batch_stat_norm_equals_batchnorm():
    x = torch.randn(5, 4, 6, 6) * 3 + 1
    ref = nn.BatchNorm2d(4, affine=False, track_running_stats=False)
    torch.testing.assert_close(BatchStatNorm(ref.eps)(x), ref(x))
    with pytest.raises(ConfigError, match="affine"):
        replace_batch_norms(nn.Sequential(nn.BatchNorm2d(4)))


def test_exports_match_the_discrete_network(discrete, tmp_path):
    scale, shift, std = [-1.0, 1.0, 1.0], [-1.0, 0.5, 0.0], [0.5, 0.25, 2.0]
    model = StandaloneClassifier(discrete, 3, scale=scale, shift=shift, std=std)
    x = torch.rand(7, 3, 8, 8)
    normalised = (x * torch.tensor(scale).view(1, 3, 1, 1) - torch.tensor(shift).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = discrete(normalised)
        torch.testing.assert_close(model(x), reference)
    export_torchscript(model, torch.rand(4, 3, 8, 8), tmp_path / "model.pt", {"class_names": ["a", "b", "c"]})
    scripted, meta = load_torchscript(tmp_path / "model.pt")
    assert meta == {"class_names": ["a", "b", "c"]}
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference)  # another batch size than traced
    export_onnx(model, torch.rand(4, 3, 8, 8), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    for batch in (x, x[:2]):
        out = session.run(None, {"images": batch.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, discrete(normalised[: len(batch)]).numpy(), atol=1e-5, rtol=1e-4)
    assert not list(tmp_path.glob(".*tmp"))


def test_parameter_and_flop_counts():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    assert count_parameters(net) == 2 * 4 * 9 + 100 * 3 + 3
    # conv: 2 FLOPs per multiply-add, 4*5*5 outputs of 2*9 inputs; linear: 2 * 100 * 3
    expected = 2 * (4 * 25 * 18) + 2 * 100 * 3
    assert flops_per_image(net, torch.randn(3, 2, 5, 5)) == expected


# ------------------------------------------------------------------------------ conv-4
def test_conv4_shapes_and_errors():
    net = Conv4(Conv4Config(in_channels=1, n_classes=5, channels=8))
    assert net(torch.randn(4, 1, 28, 28), {}).shape == (4, 5)
    assert not list(net.buffers())
    with pytest.raises(ConfigError, match="no architecture parameters"):
        net(torch.randn(2, 1, 28, 28), {"normal": torch.zeros(1)})
    with pytest.raises(ConfigError, match="channels"):
        Conv4Config(channels=0)


def test_meta_trainer_without_alphas_matches_hand_written_fomaml(tmp_path):
    """Two meta-steps of FOMAML on conv-4 through MetaTrainer (no alphas, no alpha optimiser)
    equal a hand-written first-order MAML loop with torch.optim.Adam."""

    class Fixed:
        n_way, k_shot, q_query, input_shape = 3, 2, 2, (1, 8, 8)

        def sample(self, split, rng):
            return make_task(int(rng.integers(1 << 30)), dtype=torch.float32)

    torch.manual_seed(0)
    net = Conv4(Conv4Config(in_channels=1, n_classes=3, channels=4, n_blocks=2))
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    inner = InnerLoopConfig(steps=2, lr_weights=0.3)
    trainer = MetaTrainer(
        net=net, alphas={}, sampler=Fixed(), algorithm=FOMAML(), inner=inner,
        weights_optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        alphas_optimizer=lambda p: torch.optim.Adam(p, lr=0.01), search_space=net.cfg,
        cfg=TrainerConfig(meta_steps=2, meta_batch_size=2, val_every=0, ckpt_every=0,
                          task_workers=1, n_test_tasks=3, progress=False),
        run_dir=tmp_path, seed=4,
    )
    assert trainer.opt_alphas is None
    trainer.fit()

    ref = Conv4(net.cfg)
    params = {k: nn.Parameter(v.clone()) for k, v in start.items()}
    opt = torch.optim.Adam(params.values(), lr=0.01)
    rng = np.random.default_rng(4)
    for _ in range(2):
        tasks = [Fixed().sample("train", rng) for _ in range(2)]
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        for task in tasks:
            w = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
            for _ in range(inner.steps):
                loss = F.cross_entropy(functional_call(ref, w, (task.support_x,)), task.support_y)
                g = torch.autograd.grad(loss, list(w.values()))
                w = {k: (v - 0.3 * gi).detach().requires_grad_(True) for (k, v), gi in zip(w.items(), g)}
            q = F.cross_entropy(functional_call(ref, w, (task.query_x,)), task.query_y)
            for (k, _), gi in zip(w.items(), torch.autograd.grad(q, list(w.values()))):
                grads[k] += gi / len(tasks)
        opt.zero_grad()
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
    for k, p in trainer.weights.items():
        torch.testing.assert_close(p.detach(), params[k].detach(), rtol=1e-5, atol=1e-6)

    result = evaluate(net, trainer.weights, {}, Fixed(), "test", 3, inner, net.cfg, np.random.default_rng(0))
    assert result.n_tasks == 3 and result.genotypes == () and result.diversity == {}
    state = trainer.state_dict()
    assert state["opt_alphas"] is None and state["search_space"]["model"] == "conv4"
    trainer.save()
    trainer.resume(tmp_path / "checkpoints" / "last.ckpt")
    trainer.close()

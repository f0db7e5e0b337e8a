"""The bundled meta-trained checkpoint and slim checkpoints (metanas.pretrained)."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from test_trainer import make_trainer

from metanas import pretrained, rundir
from metanas.adapt_cli import adapt_command
from metanas.adaptation import load_meta_model
from metanas.checkpoint import load_checkpoint
from metanas.errors import CheckpointError
from metanas.tasks.synthetic import make_shapes_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _finished_run(tmp_path):
    trainer = make_trainer(tmp_path, meta_steps=3, val_every=3, ckpt_every=3)
    try:
        trainer.fit()
    finally:
        trainer.close()
    (tmp_path / rundir.METRICS).write_text(json.dumps({"accuracy": 0.5, "ci95": 0.1}))
    return tmp_path


def test_a_slim_checkpoint_adapts_as_the_full_one_and_cannot_resume(tmp_path):
    run = _finished_run(tmp_path / "run")
    full = rundir.checkpoint_path(run, rundir.BEST_CKPT)
    ckpt, info = pretrained.make_slim(run, tmp_path / "shipped" / "model")
    assert (ckpt.name, info.name) == ("model.ckpt", "model.json")
    assert json.loads(info.read_text()) == {"accuracy": 0.5, "ci95": 0.1}
    state = load_checkpoint(ckpt)
    assert state["slim"] and not {"opt_weights", "opt_alphas", "rng_tasks", "rng_torch", "history"} & set(state)
    assert ckpt.stat().st_size < full.stat().st_size
    a, b = load_meta_model(full), load_meta_model(ckpt)
    assert a.inner == b.inner and a.space == b.space and a.model == b.model
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name])
    for name in a.alphas:
        assert torch.equal(a.alphas[name], b.alphas[name])
    trainer = make_trainer(tmp_path / "resumed")
    try:
        with pytest.raises(CheckpointError, match=r"is a slim checkpoint for adaptation .* cannot resume a run"):
            trainer.resume(ckpt)
    finally:
        trainer.close()


def test_making_a_slim_checkpoint_of_an_unfinished_run_fails_with_exit_2(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
    (run / rundir.METRICS).unlink()
    assert pretrained.main([str(run), str(tmp_path / "out")]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_the_bundled_checkpoint_is_an_omniglot_5_way_supernet_with_its_metrics():
    path = pretrained.default_checkpoint()
    model = load_meta_model(path)
    assert model.model["kind"] == "supernet" and model.alphas
    assert (model.space.n_classes, model.space.in_channels, model.image_size) == (5, 1, 28)
    assert load_checkpoint(path)["slim"]
    metrics = json.loads(path.with_suffix(".json").read_text())
    task = metrics["config"]["task"]
    assert (task["n_way"], task["k_shot"], metrics["n_tasks"]) == (5, 1, 600) and 0.5 < metrics["accuracy"] <= 1
    # the README beside it quotes the figures of that metrics.json
    readme = (path.parent / "README.md").read_text()
    assert f"{100 * metrics['accuracy']:.2f}" in readme


def test_metanas_adapt_without_a_checkpoint_adapts_the_bundled_one(tmp_path):
    data = tmp_path / "shapes"
    make_shapes_folder(data, n_classes=5, n_images=3, seed=0)
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        cfg = compose("adapt", overrides=[f"support={data}", f"query={data}", "export=false", "finetune_steps=1"])
    metrics = adapt_command(cfg, tmp_path / "out")
    assert metrics["checkpoint"] == str(pretrained.OMNIGLOT)
    assert (tmp_path / "out" / rundir.METRICS).is_file()


def test_a_missing_bundled_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "OMNIGLOT", tmp_path / "gone.ckpt")
    with pytest.raises(CheckpointError, match=r"bundled checkpoint .*gone\.ckpt is missing .* checkpoint=<run dir>"):
        pretrained.default_checkpoint()

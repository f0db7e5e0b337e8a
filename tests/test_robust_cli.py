"""Command lines that check their input, talk during long work, and export deployable models.

Counts and switches of both CLIs are checked (type and range, one line naming the key), JSON
results never hold NaN, error hints name only settings the command has, Hydra's own
configuration errors end like every other bad input (one line, exit status 2), long
evaluations log their progress, and exported models classify every image on its own.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_task
from hydra import compose, initialize_config_module
from test_adapt_cli import RESULTS, SAMPLERS, ckpt, folders  # noqa: F401 - fixtures
from test_trainer import RandomTasks

from metanas import rundir
from metanas.adapt_cli import adapt_command
from metanas.adaptation import adapt_support, load_meta_model
from metanas.cli import build_trainer
from metanas.engines import TaskPool
from metanas.errors import CheckpointError, ConfigError, DataError
from metanas.evaluate import evaluate
from metanas.export import (
    BatchStatNorm,
    FrozenStatNorm,
    StandaloneClassifier,
    freeze_batch_norms,
    load_torchscript,
)
from metanas.hydra_utils import config_problem
from metanas.inner import InnerLoopConfig
from metanas.search_space import DiscreteNetwork, derive_genotype
from metanas.tasks import load_image_folder
from metanas.trainer import TrainerConfig

SIZE = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
BIN = Path(sys.executable).parent
# what a failed metanas-train run may leave: its status and Hydra's own files
TRAIN_BOOKKEEPING = {rundir.STATUS, ".hydra", "cli.log"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapt_cfg(**overrides):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose("adapt", overrides=[f"{k}={v}" for k, v in overrides.items()])


def _train_cfg(*overrides):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _written(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.exists() else set()


def _run(args, cwd, prog=None):
    """A CLI in a subprocess: ``prog`` a console script in this venv, else ``python -m``."""
    cmd = [str(BIN / prog)] if prog else [sys.executable, "-m"]
    return subprocess.run([*cmd, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300, check=False)


def _one_error_line(proc, prog: str) -> str:
    """The single line of stderr, which must be ``<prog>: error: ...``; returns the message."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0][len(f"{prog}: error: "):]


# ------------------------------------------------------------------ 5: JSON files
def test_json_files_are_valid_json_without_nan(tmp_path):
    content = {"accuracy": float("nan"), "ci95": [1.0, float("inf")], "nested": {"low": -math.inf},
               "fine": 0.5, "n": 3, "rows": ({"a": float("nan")},)}

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    for name in (rundir.METRICS, rundir.STATUS, rundir.MODEL_INFO, rundir.TASK_GENOTYPES):
        text = rundir.encode(name, content).decode()
        assert json.loads(text, parse_constant=refuse) == {
            "accuracy": None, "ci95": [1.0, None], "nested": {"low": None}, "fine": 0.5, "n": 3,
            "rows": [{"a": None}]}
    rundir.write(tmp_path, {rundir.METRICS: content})
    assert rundir.read(tmp_path, rundir.METRICS)["accuracy"] is None


# ------------------------------------------------------------------ 5: metanas-adapt counts
@pytest.mark.parametrize(("overrides", "match"), [
    ({"k_shot": 0}, r"^k_shot=0 is not an integer >= 1; set k_shot to a whole number >= 1 \(or null"),
    ({"k_shot": -1}, r"^k_shot=-1 is not an integer >= 1"),
    ({"k_shot": 1.5}, r"^k_shot=1.5 is not an integer >= 1"),
    ({"k_shot": "true"}, r"^k_shot=True is not an integer >= 1"),
    ({"q_query": 0}, r"^q_query=0 is not an integer >= 1"),
    ({"n_tasks": 0}, r"^n_tasks=0 is not an integer >= 1"),
    ({"n_tasks": "abc"}, r"^n_tasks='abc' is not an integer >= 1"),
    ({"finetune_steps": -1}, r"^finetune_steps=-1 is not an integer >= 0"),
    ({"finetune_steps": 2.5}, r"^finetune_steps=2.5 is not an integer >= 0"),
    ({"image_size": 0}, r"^image_size=0 is not an integer >= 1; .* \(or null: the checkpoint's size\)"),
    ({"seed": -3}, r"^seed=-3 is not an integer >= 0"),
    ({"inner.steps": 1.5}, r"^inner.steps=1.5 is not an integer >= 0"),
    ({"inner.lr_weights": "fast"}, r"^inner.lr_weights='fast' is not a number >= 0"),
    ({"export": "maybe"}, r"^export='maybe' is not a boolean; set export=true or export=false"),
])
def test_adapt_settings_are_checked_before_anything_runs(ckpt, folders, tmp_path, overrides, match):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        adapt_command(_adapt_cfg(checkpoint=ckpt, support=folders / "support", **overrides), out)
    assert not _written(out)


def test_adapt_k_shot_zero_exits_2_through_the_cli_and_writes_nothing(ckpt, folders, tmp_path):
    out = tmp_path / "run"
    proc = _run([f"checkpoint={ckpt}", f"support={folders / 'support'}", "k_shot=0", f"out={out}"],
                tmp_path, prog="metanas-adapt")
    assert proc.returncode == 2
    assert _one_error_line(proc, "metanas-adapt").startswith("k_shot=0 is not an integer >= 1")
    assert not _written(out) & RESULTS


# ------------------------------------------------------------------ 9: integer counts, both CLIs
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"meta_steps": 2.5}, r"^trainer.meta_steps=2.5 is not an integer >= 0; set trainer.meta_steps"),
    ({"meta_steps": "abc"}, r"^trainer.meta_steps='abc' is not an integer >= 0"),
    ({"meta_steps": -1}, r"^trainer.meta_steps=-1 is not an integer >= 0"),
    ({"meta_batch_size": True}, r"^trainer.meta_batch_size=True is not an integer >= 1"),
    ({"meta_batch_size": 0}, r"^trainer.meta_batch_size=0 is not an integer >= 1"),
    ({"alpha_warmup_steps": 1.0}, r"^trainer.alpha_warmup_steps=1.0 is not an integer >= 0"),
    ({"val_every": "10"}, r"^trainer.val_every='10' is not an integer >= 0"),
    ({"n_val_tasks": 0.5}, r"^trainer.n_val_tasks=0.5 is not an integer >= 1"),
    ({"ckpt_every": None}, r"^trainer.ckpt_every=None is not an integer >= 0"),
    ({"log_every": 0}, r"^trainer.log_every=0 is not an integer >= 1"),
    ({"n_test_tasks": 1e3}, r"^trainer.n_test_tasks=1000.0 is not an integer >= 1"),
    ({"test_inner_steps": 2.5}, r"^trainer.test_inner_steps=2.5 is not an integer >= 0; .*\(or null"),
    ({"task_workers": False}, r"^trainer.task_workers=False is not an integer >= 0"),
])
def test_trainer_counts_must_be_integers_in_range(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainerConfig(**kwargs)


def test_good_counts_pass_as_they_are():
    cfg = TrainerConfig(meta_steps=np.int64(3), test_inner_steps=None, task_workers=0)
    assert cfg.meta_steps == 3 and cfg.test_inner_steps is None
    assert InnerLoopConfig(steps=0, shuffle_seed=np.int32(2)).steps == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 2.5}, r"^inner.steps=2.5 is not an integer >= 0; set inner.steps"),
    ({"steps": "abc"}, r"^inner.steps='abc' is not an integer >= 0"),
    ({"steps": True}, r"^inner.steps=True is not an integer >= 0"),
    ({"steps": -1}, r"^inner.steps=-1 is not an integer >= 0"),
    ({"shuffle_seed": 0.5}, r"^inner.shuffle_seed=0.5 is not an integer >= 0"),
])
def test_inner_steps_must_be_an_integer(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        InnerLoopConfig(**kwargs)


@pytest.mark.parametrize(("override", "match"), [
    ("seed=abc", r"^seed='abc' is not an integer >= 0; set seed to an integer >= 0"),
    ("seed=1.5", r"^seed=1.5 is not an integer >= 0"),
    ("inner.steps=2.5", r"^inner.steps=2.5 is not an integer >= 0"),
    ("trainer.meta_steps=abc", r"^trainer.meta_steps='abc' is not an integer >= 0"),
])
def test_train_config_counts_are_checked_when_building(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        build_trainer(_train_cfg("experiment=smoke", "device=cpu", override), tmp_path / "run")
    assert not _written(tmp_path / "run")


def test_train_non_integer_meta_steps_exits_2_without_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["metanas.cli", "experiment=smoke", "device=cpu", "trainer.meta_steps=2.5",
                 f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2
    message = _one_error_line(proc, "metanas-train")
    assert message == "trainer.meta_steps=2.5 is not an integer >= 0; set trainer.meta_steps to a whole number >= 0"
    assert _written(run_dir) <= TRAIN_BOOKKEEPING
    assert json.loads((run_dir / rundir.STATUS).read_text())["status"] == "failed"


def test_adapt_non_integer_finetune_steps_exits_2(ckpt, folders, tmp_path):
    out = tmp_path / "run"
    proc = _run(["metanas.adapt_cli", f"checkpoint={ckpt}", f"support={folders / 'support'}",
                 "finetune_steps=2.5", f"out={out}"], tmp_path)
    assert proc.returncode == 2
    assert _one_error_line(proc, "metanas-adapt").startswith("finetune_steps=2.5 is not an integer >= 0")
    assert not _written(out) & RESULTS


# ------------------------------------------------------------------ 11: hints name real settings
def _copy_classes(folders, tmp_path, name, keep):
    dst = tmp_path / name
    for c in sorted(p.name for p in (folders / "all").iterdir() if not p.name.startswith("."))[:keep]:
        shutil.copytree(folders / "support" / c, dst / c)
    return dst


@pytest.mark.parametrize("keep", [1, 2])
def test_support_folder_with_too_few_classes_names_the_sub_folders(ckpt, folders, tmp_path, keep):
    support = _copy_classes(folders, tmp_path, "support", keep)
    with pytest.raises(CheckpointError) as info:
        adapt_command(_adapt_cfg(checkpoint=ckpt, support=support), tmp_path / "out")
    message = str(info.value)
    assert f"has {keep} class" in message and "give the support folder 3 class sub-folders" in message
    assert "n_way" not in message
    assert ("meta-trained for 2-way tasks" in message) == (keep == 2)  # never "1-way"
    assert not _written(tmp_path / "out")


def test_data_folder_with_too_few_classes_names_no_split_fractions(ckpt, folders, tmp_path):
    data = tmp_path / "data"
    for c in sorted(p.name for p in (folders / "all").iterdir() if not p.name.startswith("."))[:2]:
        shutil.copytree(folders / "all" / c, data / c)
    with pytest.raises(DataError) as info:
        adapt_command(_adapt_cfg(checkpoint=ckpt, data=data, n_tasks=2), tmp_path / "out")
    message = str(info.value)
    assert "has 2 class sub-folders" in message and "give it at least 3 class sub-folders" in message
    assert "split_fractions" not in message and "n_way" not in message
    assert not _written(tmp_path / "out")


@pytest.fixture
def custom(tmp_path, monkeypatch):
    (tmp_path / "my_samplers.py").write_text(SAMPLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(("overrides", "hint"), [
    ({"+task.n_way": 4}, "set task.n_way=3"),
    ({"+task.channels": 3}, "set task.channels=1"),
    ({"+task.size": 20}, "make the task sampler give 16x16 images"),  # it has no task.image_size
])
def test_sampler_mismatch_names_the_task_settings_it_has(ckpt, custom, tmp_path, overrides, hint):
    cfg = _adapt_cfg(checkpoint=ckpt, n_tasks=2, **{"+task._target_": "my_samplers.Blobs"}, **overrides)
    with pytest.raises(CheckpointError) as info:
        adapt_command(cfg, tmp_path / "out")
    message = str(info.value)
    assert hint in message and "image_size=" not in message and "n_way=4" not in message
    assert " channels=" not in message


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares ``width x height`` grey pixels (and holds almost none)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


def test_a_huge_image_is_called_too_large_with_its_size_and_the_limit(ckpt, folders, tmp_path):
    support = tmp_path / "support"
    shutil.copytree(folders / "support", support)
    victim = min(support.rglob("*.png"))
    _png_header_only(victim, 14000, 14000)  # 196 megapixels
    with pytest.raises(DataError) as info:
        adapt_command(_adapt_cfg(checkpoint=ckpt, support=support), tmp_path / "out")
    message = str(info.value)
    assert f"image {victim} is too large: 196,000,000 pixels (196 megapixels)" in message
    assert "over Pillow's limit of 178,956,970 pixels" in message and "downscale it" in message
    assert "truncated" not in message and "corrupt" not in message
    assert not _written(tmp_path / "out")


def test_adapt_support_class_mismatch_exits_2_through_the_cli(ckpt, folders, tmp_path):
    support = _copy_classes(folders, tmp_path, "support", 1)
    out = tmp_path / "run"
    proc = _run(["metanas.adapt_cli", f"checkpoint={ckpt}", f"support={support}", f"out={out}"], tmp_path)
    assert proc.returncode == 2
    message = _one_error_line(proc, "metanas-adapt")
    assert "give the support folder 3 class sub-folders" in message and "n_way" not in message
    assert not _written(out) & RESULTS


# ------------------------------------------------------------------ 12: progress lines in the log
def test_evaluation_without_a_bar_logs_progress_every_10_percent(tiny, caplog):
    net, weights, alphas, space = tiny
    net = net.float()
    weights = {k: v.float() for k, v in weights.items()}
    alphas = {k: v.float() for k, v in alphas.items()}
    caplog.set_level(logging.INFO, logger="metanas.evaluate")
    result = evaluate(net, weights, alphas, RandomTasks(), "test", 20, InnerLoopConfig(steps=1), space,
                      np.random.default_rng(0), pool=TaskPool(net, 1), compare_frozen=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "metanas.evaluate"]
    assert len(lines) == 10, lines
    for k, line in enumerate(lines, start=1):
        done = 2 * k  # one worker: tasks in chunks of 2; a line every 2 tasks
        running = 100 * np.mean(result.accuracies[:done])
        assert line.startswith(f"meta-test: {done}/20 tasks ({10 * k}%) in ")
        assert line.endswith(f" s, running accuracy {running:.2f} %")
    caplog.clear()
    evaluate(net, weights, alphas, RandomTasks(), "val", 4, InnerLoopConfig(steps=1), space,
             np.random.default_rng(0), progress=True)
    assert not [r for r in caplog.records if r.name == "metanas.evaluate"]  # the bar shows it


def test_sampled_task_adaptation_logs_its_progress(ckpt, folders, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="metanas.evaluate")
    adapt_command(_adapt_cfg(checkpoint=ckpt, data=folders / "all", n_tasks=3, q_query=2), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "metanas.evaluate"]
    assert lines and lines[-1].startswith("meta-test: 3/3 tasks (100%) in ")
    assert "running accuracy" in lines[-1]


# ------------------------------------------------------------------ 13: Hydra's errors exit 2
@pytest.mark.parametrize(("argv", "expected"), [
    (["trainer.nope=1"], "trainer.nope is not a setting of metanas-train: check its spelling "
                         "(metanas-train --cfg job lists every setting)"),
    (["algorithm=nope"], "algorithm=nope is not an option of algorithm; use one of fomaml, maml, reptile"),
    (["-m", "trainer.nope=1,2"], "trainer.nope is not a setting of metanas-train"),
    (["-m", "seed=0,1", "algorithm=reptile,nope"], "algorithm=nope is not an option of algorithm"),
    (["trainer.meta_steps=["], "cannot parse the override 'trainer.meta_steps=['"),
    (["seed=0,1"], "Ambiguous value for argument 'seed=0,1'; 1. To use it as a list"),
    (["~trainer.nope"], "Could not delete from config. 'trainer.nope' does not exist. Check its spelling"),
])
def test_hydra_configuration_errors_become_one_line(argv, expected):
    problem = config_problem(argv, "train", "metanas-train")
    assert problem is not None and problem.startswith(expected) and "\n" not in problem


@pytest.mark.parametrize("argv", [
    ["experiment=smoke"], ["-m", "seed=0,1", "algorithm=reptile,fomaml"], ["hparams_search=omniglot_optuna"],
    ["-m", "inner.lr_weights=interval(0.01,0.5)"], ["--cfg", "job", "trainer.nope=1"], ["--help"],
])
def test_good_commands_and_show_commands_are_left_to_hydra(argv):
    assert config_problem(argv, "train", "metanas-train") is None


def test_adapt_unknown_key_is_one_line_too():
    assert config_problem(["k_shots=1"], "adapt", "metanas-adapt") == (
        "k_shots is not a setting of metanas-adapt: check its spelling (metanas-adapt --cfg job lists every "
        "setting)")


@pytest.mark.parametrize(("args", "expected"), [
    (["trainer.nope=1"], "trainer.nope is not a setting of metanas-train"),
    (["-m", "algorithm=reptile,nope"], "algorithm=nope is not an option of algorithm"),
])
def test_train_hydra_errors_exit_2_through_the_console_script(tmp_path, args, expected):
    proc = _run([*args, "experiment=smoke", f"hydra.run.dir={tmp_path / 'r'}",
                 f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path, prog="metanas-train")
    assert proc.returncode == 2
    assert _one_error_line(proc, "metanas-train").startswith(expected)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_adapt_hydra_error_exits_2_through_python_m(ckpt, tmp_path):
    out = tmp_path / "run"
    proc = _run(["metanas.adapt_cli", f"checkpoint={ckpt}", "nope=1", f"out={out}"], tmp_path)
    assert proc.returncode == 2
    assert _one_error_line(proc, "metanas-adapt").startswith("nope is not a setting of metanas-adapt")
    assert not out.exists()


# ------------------------------------------------------------------ 14: batch-independent exports
def test_unknown_export_norm_is_refused(ckpt, folders, tmp_path):
    with pytest.raises(ConfigError, match=r"^export_norm='running' is unknown; use export_norm=support"):
        adapt_command(_adapt_cfg(checkpoint=ckpt, support=folders / "support", export_norm="running"), tmp_path)
    assert not _written(tmp_path)


@pytest.fixture(scope="module")
def exported(ckpt, folders, tmp_path_factory):
    """metanas-adapt (default export) on the labelled query folder: (out dir, metrics, task, sx, qx)."""
    out = tmp_path_factory.mktemp("exported")
    metrics = adapt_command(_adapt_cfg(checkpoint=ckpt, support=folders / "support", query=folders / "query"), out)
    support = load_image_folder(folders / "support", SIZE, 1, cache=False)
    query = load_image_folder(folders / "query", SIZE, 1, cache=False)
    sx = torch.from_numpy(support.images.astype(np.float32) / 255)
    qx = torch.from_numpy(query.images.astype(np.float32) / 255)
    task = adapt_support(load_meta_model(ckpt), sx, torch.from_numpy(support.labels), finetune_steps=10)
    return out, metrics, task, sx, qx


def test_exported_models_classify_each_image_on_its_own(exported):
    out, metrics, task, sx, qx = exported
    frozen = StandaloneClassifier(task.discrete, 1, support=sx)
    scripted, meta = load_torchscript(out / rundir.TORCHSCRIPT)
    session = ort.InferenceSession(str(out / rundir.ONNX))
    with torch.no_grad():
        reference = frozen(qx)
        batched = scripted(qx)
        single = torch.cat([scripted(qx[i : i + 1]) for i in range(len(qx))])
        reordered = scripted(qx.flip(0)).flip(0)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-5)  # TorchScript = frozen network
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-5)  # per image = batched
    torch.testing.assert_close(reordered, batched, atol=1e-5, rtol=1e-5)
    onnx_batched = session.run(None, {"images": qx.numpy()})[0]
    onnx_single = np.concatenate([session.run(None, {"images": qx[i : i + 1].numpy()})[0] for i in range(len(qx))])
    np.testing.assert_allclose(onnx_batched, reference.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_single, onnx_batched, atol=1e-4, rtol=1e-4)
    # the per-image results differ from the batch-statistics network's on the same batch
    assert not torch.allclose(reference, task.discrete_logits(qx), atol=1e-3)
    # predictions.csv is the exported model's, one image at a time
    rows = list(csv.DictReader((out / rundir.PREDICTIONS).open()))
    written = torch.tensor([[float(r[f"p_{c}"]) for c in metrics["class_names"]] for r in rows])
    torch.testing.assert_close(written, torch.softmax(single, -1), atol=1e-5, rtol=0)
    info = json.loads((out / rundir.MODEL_INFO).read_text())
    assert info["export_norm"] == meta["export_norm"] == metrics["export_norm"] == "support"
    assert "6 support images, frozen" in info["input"]["note"]
    correct = sum(r["predicted"] == r["label"] for r in rows)
    assert metrics["accuracy"] == metrics["exported"]["accuracy"] == pytest.approx(correct / len(rows))
    labels = torch.tensor([metrics["class_names"].index(r["label"]) for r in rows])
    hits = int((task.discrete_logits(qx).argmax(-1) == labels).sum())
    assert metrics["discrete"]["accuracy"] == pytest.approx(hits / len(rows))  # transductive, kept


def test_batch_statistics_stay_an_explicit_option(ckpt, folders, exported, tmp_path):
    _, _, task, sx, qx = exported
    metrics = adapt_command(_adapt_cfg(checkpoint=ckpt, support=folders / "support", query=folders / "query",
                                       export_norm="batch"), tmp_path)
    scripted, meta = load_torchscript(tmp_path / rundir.TORCHSCRIPT)
    with torch.no_grad():
        reference = task.discrete_logits(qx)  # batch statistics of the whole query batch
        torch.testing.assert_close(scripted(qx), reference, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(scripted(qx[:1]), reference[:1], atol=1e-3)  # depends on the batch
    onnx_out = ort.InferenceSession(str(tmp_path / rundir.ONNX)).run(None, {"images": qx.numpy()})[0]
    np.testing.assert_allclose(onnx_out, reference.numpy(), atol=1e-4, rtol=1e-4)
    rows = list(csv.DictReader((tmp_path / rundir.PREDICTIONS).open()))
    written = torch.tensor([[float(r[f"p_{c}"]) for c in metrics["class_names"]] for r in rows])
    torch.testing.assert_close(written, torch.softmax(reference, -1), atol=2e-6, rtol=0)
    assert meta["export_norm"] == metrics["export_norm"] == "batch"
    assert metrics["exported"]["accuracy"] == metrics["discrete"]["accuracy"]


def test_frozen_statistics_are_buffers_from_the_support_set(tiny):
    net, weights, alphas, space = tiny
    discrete = DiscreteNetwork.from_supernet(derive_genotype(alphas, space), space, weights).eval()
    support = make_task(3).support_x
    frozen = freeze_batch_norms(discrete, support)
    norms = [m for m in frozen.modules() if isinstance(m, FrozenStatNorm)]
    assert norms and not any(isinstance(m, (BatchStatNorm, torch.nn.BatchNorm2d)) for m in frozen.modules())
    assert {n.rsplit(".", 1)[-1] for n, _ in frozen.named_buffers()} == {"running_mean", "running_var"}
    assert not any(isinstance(m, FrozenStatNorm) for m in discrete.modules())  # the original is kept
    with torch.no_grad():
        torch.testing.assert_close(frozen(support), discrete(support))  # on the support set: the same
        query = make_task(4).query_x
        single = torch.cat([frozen(query[i : i + 1]) for i in range(len(query))])
        torch.testing.assert_close(single, frozen(query))
        # the stem's norm holds the statistics of the stem convolution's output on the support set
        stem_out = discrete.stem[0](support)
    stem_norm = frozen.stem[1]
    assert isinstance(stem_norm, FrozenStatNorm)
    torch.testing.assert_close(stem_norm.running_mean.flatten(), stem_out.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(stem_norm.running_var.flatten(), stem_out.var(dim=(0, 2, 3), unbiased=False))

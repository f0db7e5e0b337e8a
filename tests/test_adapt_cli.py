"""metanas-adapt: end to end through the CLI, both modes, exports, and every bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_space
from hydra import compose, initialize_config_module
from metanas.tasks import load_image_folder
from metanas.tasks.synthetic import make_shapes_folder

from metanas.adapt_cli import adapt_command
from metanas.adaptation import adapt_support, load_meta_model, wilson_ci95
from metanas.checkpoint import save_checkpoint
from metanas.errors import CheckpointError, ConfigError, DataError
from metanas.export import StandaloneClassifier, load_torchscript
from metanas.search_space import SearchNetwork, init_alphas

SIZE = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
RESULTS = {"metrics.json", "genotype.json", "cells.png", "predictions.csv", "model.pt", "model.onnx",
           "model_info.json", "task_genotypes.json"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 3-way, 1-channel checkpoint meta-trained (nominally) on 16x16 images."""
    space = tiny_space(n_classes=3)
    torch.manual_seed(0)
    net = SearchNetwork(space)
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    save_checkpoint(path, {
        "step": 1, "search_space": space.to_dict(),
        "weights": {k: v.detach() for k, v in net.named_parameters()},
        "alphas": init_alphas(space, generator=torch.Generator().manual_seed(1)),
        "config": {"task": {"image_size": SIZE},
                   "inner": {"_target_": "metanas.inner.InnerLoopConfig", "steps": 2, "lr_weights": 0.1,
                             "lr_alphas": 0.1}},
    })
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """support/ (3 classes x 2 images), query/ (3 x 4, labelled), unlabelled/ (5 images), all/."""
    root = tmp_path_factory.mktemp("data")
    make_shapes_folder(root / "all", n_classes=3, n_images=6, seed=2)
    for c in sorted(p.name for p in (root / "all").iterdir() if not p.name.startswith(".")):
        files = sorted((root / "all" / c).iterdir())
        for sub, part in (("support", files[:2]), ("query", files[2:])):
            (root / sub / c).mkdir(parents=True)
            for f in part:
                shutil.copy(f, root / sub / c / f.name)
        (root / "unlabelled").mkdir(exist_ok=True)
        shutil.copy(files[-1], root / "unlabelled" / f"{c}_{files[-1].name}")
    return root


def _cfg(**overrides):
    args = [f"{k}={v}" for k, v in overrides.items()]
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose("adapt", overrides=args)


def _written(out):
    return {p.name for p in out.iterdir()} if out.exists() else set()


@pytest.mark.slow
def test_cli_end_to_end_support_and_labelled_query(ckpt, folders, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.adapt_cli", f"checkpoint={ckpt}", f"support={folders / 'support'}",
         f"query={folders / 'query'}", f"out={out}"],
        capture_output=True, text=True, timeout=300, check=False, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout
    assert RESULTS - {"task_genotypes.json"} <= _written(out)
    metrics = json.loads((out / "metrics.json").read_text())
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12 and metrics["query_images"] == 12
    correct = sum(r["predicted"] == r["label"] for r in rows)
    acc, low, high = wilson_ci95(correct, 12)
    # predictions.csv is the exported model's; metrics.json has its accuracy as "accuracy"
    assert metrics["exported"] == pytest.approx(
        {"accuracy": acc, "ci95_low": low, "ci95_high": high, "ci95": (high - low) / 2, "interval": "wilson"})
    assert metrics["accuracy"] == acc and metrics["export_norm"] == "support"
    info = json.loads((out / "model_info.json").read_text())
    assert info["class_names"] == metrics["class_names"] and info["parameters"] > 0
    assert info["flops_per_image"] > 0 and info["export_norm"] == "support"

    # The pipeline recomputed in-process gives the same task network ...
    model = load_meta_model(ckpt)
    support = load_image_folder(folders / "support", SIZE, 1, cache=False)
    query = load_image_folder(folders / "query", SIZE, 1, cache=False)
    sx = torch.from_numpy(support.images.astype(np.float32) / 255)
    qx = torch.from_numpy(query.images.astype(np.float32) / 255)
    assert metrics["finetune_steps"] == 10  # the default
    task = adapt_support(model, sx, torch.from_numpy(support.labels), finetune_steps=10)
    assert json.loads((out / "genotype.json").read_text()) == task.genotype.to_dict()
    # "discrete" is the task network's transductive accuracy (all query images in one batch)
    hits = int((task.discrete_logits(qx).argmax(-1).numpy() == query.labels).sum())
    assert metrics["discrete"]["accuracy"] == pytest.approx(hits / 12)
    # the default export: the task network with BatchNorm statistics frozen at the support set's
    frozen = StandaloneClassifier(task.discrete, 1, support=sx)
    with torch.no_grad():
        reference = frozen(qx)
    written = torch.tensor([[float(r[f"p_{c}"]) for c in metrics["class_names"]] for r in rows])
    torch.testing.assert_close(written, torch.softmax(reference, -1), atol=2e-6, rtol=0)
    # ... and the exported files, loaded without metanas, compute exactly that network, each
    # image on its own: one at a time gives what the whole batch gives.
    scripted, meta = load_torchscript(out / "model.pt")
    assert meta["class_names"] == metrics["class_names"] and meta["export_norm"] == "support"
    session = ort.InferenceSession(str(out / "model.onnx"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(qx), reference, atol=1e-5, rtol=1e-5)
        one_by_one = torch.cat([scripted(qx[i : i + 1]) for i in range(len(qx))])
    torch.testing.assert_close(one_by_one, reference, atol=1e-5, rtol=1e-5)
    onnx_out = session.run(None, {"images": qx.numpy()})[0]
    np.testing.assert_allclose(onnx_out, reference.numpy(), atol=1e-4, rtol=1e-4)
    onnx_one = np.concatenate([session.run(None, {"images": qx[i : i + 1].numpy()})[0] for i in range(len(qx))])
    np.testing.assert_allclose(onnx_one, reference.numpy(), atol=1e-4, rtol=1e-4)


def test_cli_bad_input_exits_2_without_results(ckpt, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "metanas.adapt_cli", f"checkpoint={ckpt}", f"support={tmp_path / 'nope'}",
         f"out={out}"],
        capture_output=True, text=True, timeout=300, check=False, env=ENV,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("metanas-adapt: error: support folder")
    assert not _written(out) & RESULTS


def test_unlabelled_query_gives_predictions_only(ckpt, folders, tmp_path):
    metrics = adapt_command(_cfg(checkpoint=ckpt, support=folders / "support", query=folders / "unlabelled",
                                 export="false"), tmp_path)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 3 and "label" not in rows[0] and "discrete" not in metrics
    assert {r["predicted"] for r in rows} <= set(metrics["class_names"])
    assert not (tmp_path / "model.pt").exists() and (tmp_path / "model_info.json").exists()


def test_sampled_tasks_from_an_image_folder(ckpt, folders, tmp_path):
    metrics = adapt_command(_cfg(checkpoint=ckpt, data=folders / "all", n_tasks=3, q_query=3), tmp_path)
    assert metrics["n_tasks"] == 3 and metrics["k_shot"] == 1
    for name in ("supernet", "discrete"):
        assert 0 <= metrics[name]["accuracy"] <= 1 and metrics[name]["ci95"] >= 0
    per_task = json.loads((tmp_path / "task_genotypes.json").read_text())
    assert len(per_task) == 3
    assert metrics["discrete"]["accuracy"] == pytest.approx(np.mean([t["discrete_accuracy"] for t in per_task]))
    # same seed, same tasks, same numbers
    again = adapt_command(_cfg(checkpoint=ckpt, data=folders / "all", n_tasks=3, q_query=3), tmp_path / "b")
    assert again["discrete"] == metrics["discrete"]


SAMPLERS = textwrap.dedent('''
    import numpy as np, torch
    from metanas.tasks import Task

    class Blobs:
        """A custom sampler: classes differ in mean intensity."""
        def __init__(self, n_way=3, k_shot=1, q_query=2, channels=1, size=16):
            self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
            self.input_shape = (channels, size, size)

        def sample(self, split, rng):
            def block(k):
                y = np.repeat(np.arange(self.n_way), k)
                x = rng.normal(size=(len(y), *self.input_shape)) + y[:, None, None, None]
                return torch.tensor(x, dtype=torch.float32), torch.tensor(y)
            sx, sy = block(self.k_shot)
            qx, qy = block(self.q_query)
            return Task(sx, sy, qx, qy, tuple(range(self.n_way)))

    class NotASampler:
        n_way = 3
''')


@pytest.fixture
def custom(tmp_path, monkeypatch):
    (tmp_path / "my_samplers.py").write_text(SAMPLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_custom_sampler_through_task_target(ckpt, custom, tmp_path):
    metrics = adapt_command(_cfg(checkpoint=ckpt, **{"+task._target_": "my_samplers.Blobs"}, n_tasks=2),
                            tmp_path / "out")
    assert metrics["n_tasks"] == 2 and metrics["dataset"] == "task sampler Blobs"


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"+task._target_": "my_samplers.NotASampler"}, ConfigError, "NotASampler is not a TaskSampler"),
        ({"+task._target_": "my_samplers.Blobs", "+task.channels": 3}, CheckpointError,
         "takes 1-channel images but task sampler Blobs gives 3-channel"),
        ({"+task._target_": "my_samplers.Blobs", "+task.n_way": 4}, CheckpointError, "meta-trained for 3-way"),
        ({"+task._target_": "my_samplers.Blobs", "+task.size": 20}, CheckpointError,
         "make the task sampler give 16x16 images"),
    ],
)
def test_bad_sampler_or_mismatched_checkpoint(ckpt, custom, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        adapt_command(_cfg(checkpoint=ckpt, n_tasks=2, **overrides), tmp_path / "out")
    assert not _written(tmp_path / "out")


def _bad(tmp_path, name, folders):
    """A copy of folders/<name> to damage."""
    dst = tmp_path / name
    shutil.copytree(folders / name, dst, ignore=shutil.ignore_patterns(".metanas_cache"))
    return dst


def test_bad_folders_and_images(ckpt, folders, tmp_path):
    out = tmp_path / "out"
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(({"support": empty}, DataError, "no class sub-folders"))
    cases.append(({"support": tmp_path / "missing"}, DataError, "does not exist"))
    cases.append(({"data": folders / "all", "q_query": 6}, DataError, r"fewer images than k_shot \+ q_query = 7"))
    cases.append(({"support": folders / "support", "k_shot": 3}, DataError, "fewer than k_shot=3"))
    truncated = _bad(tmp_path, "support", folders)
    victim = min(truncated.rglob("*.png"))
    victim.write_bytes(victim.read_bytes()[:50])
    cases.append(({"support": truncated}, DataError, rf"{victim.name} cannot be read"))
    two = _bad(tmp_path / "x", "support", folders)
    shutil.rmtree(min(two.iterdir()))
    cases.append(({"support": two}, CheckpointError, "has 2 classes"))
    cases.append(({"support": folders / "support", "image_size": 20}, CheckpointError, "set image_size=16"))
    cases.append(({"support": folders / "support", "query": empty}, DataError, "holds no images"))
    extra = _bad(tmp_path / "y", "query", folders)
    min(extra.iterdir()).rename(extra / "zzz_unknown")
    cases.append(({"support": folders / "support", "query": extra}, DataError, r"\['zzz_unknown'\] that the support"))
    cases.append(({}, ConfigError, "nothing to adapt to"))
    cases.append(({"data": folders / "all", "query": folders / "query"}, ConfigError, "query= needs support="))
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            adapt_command(_cfg(checkpoint=ckpt, **overrides), out)
            pytest.fail(f"no error for {overrides}")
        assert not _written(out), overrides
    with pytest.raises(CheckpointError, match="does not exist"):
        adapt_command(_cfg(checkpoint=tmp_path / "none.ckpt", support=folders / "support"), out)


def test_sampled_tasks_do_not_depend_on_the_number_of_threads(ckpt, folders):
    """evaluate_tasks on two threads gives exactly the results of the plain loop."""
    from metanas.adaptation import evaluate_tasks
    from metanas.tasks import ImageFolderTasks

    model = load_meta_model(ckpt)
    sampler = ImageFolderTasks(folders / "all", n_way=3, k_shot=1, q_query=2, image_size=SIZE,
                               channels=1, split_fractions=[0.0, 0.0, 1.0])
    runs = [evaluate_tasks(model, sampler, "test", 4, np.random.default_rng(0), workers=w) for w in (1, 2)]
    assert runs[0]["accuracies"] == runs[1]["accuracies"]
    assert [g.to_json() for g in runs[0]["genotypes"]] == [g.to_json() for g in runs[1]["genotypes"]]


def test_sampled_tasks_in_flight_follow_the_memory_budget(ckpt, folders, monkeypatch):
    """memory_budget_gb bounds the tasks adapted at once (same results); too small a budget is
    a clear error naming the setting."""
    from metanas import adaptation
    from metanas.memory import GB, estimate_task_bytes
    from metanas.tasks import ImageFolderTasks

    model = load_meta_model(ckpt)
    sampler = ImageFolderTasks(folders / "all", n_way=3, k_shot=1, q_query=2, image_size=SIZE,
                               channels=1, split_fractions=[0.0, 0.0, 1.0])
    task = sampler.sample("test", np.random.default_rng(0))
    per_task = estimate_task_bytes(model.net, model.weights, model.alphas, task, model.inner) / GB
    pools = []

    class Recorded(adaptation.TaskPool):
        def map(self, *args, **kwargs):
            pools.append(self.in_flight)
            return super().map(*args, **kwargs)

    monkeypatch.setattr(adaptation, "TaskPool", Recorded)
    run = lambda gb: adaptation.evaluate_tasks(model, sampler, "test", 4, np.random.default_rng(0),  # noqa: E731
                                               workers=2, memory_budget_gb=gb)
    bounded, free = run(1.5 * per_task), run(1000.0)
    assert bounded["accuracies"] == free["accuracies"]
    assert set(pools[: len(pools) // 2]) == {1} and set(pools[len(pools) // 2:]) == {2}
    with pytest.raises(ConfigError, match=r"^memory_budget_gb=1e-09 cannot hold one task in flight, "
                                          r"estimated at .* GiB; use fewer support images"):
        run(1e-9)
    with pytest.raises(ConfigError, match=r"memory_budget_gb=-1 is not a positive number of GiB"):
        adapt_command(_cfg(checkpoint=ckpt, data=folders / "all", memory_budget_gb=-1), ckpt.parent / "bad")

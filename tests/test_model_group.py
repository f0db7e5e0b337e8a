"""The ``model`` config group: supernet, conv-4 and genotype networks through metanas-train and
metanas-adapt; conv-4 parameter matching and the genotype network's size against hand counts;
bad genotype files; resuming with another model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_space
from hydra import compose, initialize_config_module
from metanas.tasks.synthetic import make_shapes_folder

from metanas.adapt_cli import adapt_command
from metanas.adaptation import load_meta_model
from metanas.baselines import Conv4, Conv4Config
from metanas.checkpoint import load_checkpoint, save_checkpoint
from metanas.cli import build_trainer
from metanas.errors import CheckpointError, ConfigError
from metanas.models import conv4, genotype
from metanas.search_space import DiscreteNetwork, Genotype, SearchNetwork

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# experiment=smoke, smaller still: 2 meta-steps, 1 inner step, 2 validation and 3 test tasks
SMOKE = ["experiment=smoke", "trainer.meta_steps=2", "trainer.val_every=2", "trainer.n_val_tasks=2",
         "trainer.n_test_tasks=3", "trainer.ckpt_every=1", "inner.steps=1", "trainer.progress=false"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_train(*args, cwd):
    """metanas-train at smoke size; its log lines and errors both in ``.stdout``."""
    return subprocess.run([sys.executable, "-m", "metanas.cli", *SMOKE, *args], cwd=cwd, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def _compose(overrides, name="train"):
    with initialize_config_module(config_module="metanas.conf", version_base="1.3"):
        return compose(name, overrides=overrides)


# ----------------------------------------------------------------------------- hand counts
def conv4_hand_count(c_in: int, n_classes: int, c: int, n_blocks: int) -> int:
    """3x3 convs with bias (first from c_in, then c -> c), parameter-free BatchNorms, linear."""
    return (9 * c_in * c + c) + (n_blocks - 1) * (9 * c * c + c) + (c * n_classes + n_classes)


def closest_channels(target: int, c_in: int, n_classes: int, n_blocks: int) -> int:
    """Plain scan: the channel count whose hand count is nearest the target (smaller on ties)."""
    return min(range(1, 2000), key=lambda c: (abs(conv4_hand_count(c_in, n_classes, c, n_blocks) - target), c))


def test_conv4_hand_count_is_the_modules_count():
    for c_in, n, c, blocks in ((1, 5, 48, 4), (3, 20, 7, 2), (1, 3, 1, 1)):
        net = Conv4(Conv4Config(c_in, n, c, blocks))
        assert sum(p.numel() for p in net.parameters()) == conv4_hand_count(c_in, n, c, blocks)


@pytest.mark.parametrize("target", [1, 100, 5_000, conv4_hand_count(1, 3, 48, 4),
                                    conv4_hand_count(1, 3, 48, 4) + 1, 63_000, 154_917])
def test_conv4_match_parameters_picks_the_closest_channel_count(target):
    space = tiny_space()  # 1 channel in, 3 classes
    spec = conv4(space, match_parameters=target)
    assert spec == {"kind": "conv4", "channels": closest_channels(target, 1, 3, 4), "n_blocks": 4}
    three = conv4(space, n_blocks=3, match_parameters=target)
    assert three["channels"] == closest_channels(target, 1, 3, 3)


def test_conv4_ties_pick_the_smaller_network():
    # halfway between the counts of 2 and 3 channels (1 input channel, 4 classes, 1 block: 14c + 4)
    low, high = conv4_hand_count(1, 4, 2, 1), conv4_hand_count(1, 4, 3, 1)
    assert (low, high) == (32, 46)
    assert conv4(tiny_space(n_classes=4), n_blocks=1, match_parameters=39)["channels"] == 2
    assert conv4(tiny_space(n_classes=4), n_blocks=1, match_parameters=40)["channels"] == 3


def test_conv4_match_parameters_supernet_and_plain_channels():
    space = tiny_space(channels=8)
    target = sum(p.numel() for p in SearchNetwork(space).parameters())
    assert conv4(space, match_parameters="supernet")["channels"] == closest_channels(target, 1, 3, 4)
    assert conv4(space, channels=12) == {"kind": "conv4", "channels": 12, "n_blocks": 4}


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "super", "100"])
def test_conv4_bad_match_parameters_is_one_line(bad):
    with pytest.raises(ConfigError) as err:
        conv4(tiny_space(), match_parameters=bad)
    msg = str(err.value)
    assert "model.match_parameters" in msg and repr(bad) in msg and "supernet" in msg and "\n" not in msg


GENOTYPE = {
    "normal": [[["conv_3x3", 0], ["skip_connect", 1]], [["sep_conv_3x3", 2], ["avg_pool_3x3", 0]]],
    "normal_concat": [2, 3],
    "reduce": [[["skip_connect", 0], ["conv_3x3", 1]], [["sep_conv_3x3", 1], ["conv_3x3", 2]]],
    "reduce_concat": [3],
}


def test_genotype_network_weight_count_by_hand():
    # tiny_space: 1 input channel, 3 classes, C=4, stem multiplier 1, cells: normal, reduction
    # (channels doubled to 8), 2 nodes, ops conv_3x3 / skip_connect / avg_pool_3x3 / sep_conv_3x3
    space = tiny_space()
    stem = 1 * 4 * 9                                        # 3x3 conv 1 -> 4, no bias
    # normal cell, C=4, inputs 4 and 4: two 1x1 preprocessing convs
    normal = 4 * 4 + 4 * 4
    normal += 9 * 4 * 4                                     # conv_3x3
    normal += 2 * (4 * 9 + 4 * 4)                           # sep_conv_3x3: 2 x (depthwise + pointwise)
    # skip_connect (stride 1) and avg_pool_3x3 hold no weights; output 2 nodes x 4 = 8 channels
    # reduction cell, C=8, inputs 4 (stem) and 8: two 1x1 preprocessing convs
    reduce = 4 * 8 + 8 * 8
    reduce += 2 * (8 * 4)                                   # skip_connect, stride 2: factorised reduce
    reduce += 9 * 8 * 8                                     # conv_3x3 from input 1
    reduce += 2 * (8 * 9 + 8 * 8)                           # sep_conv_3x3 from input 1
    reduce += 9 * 8 * 8                                     # conv_3x3 from node 2
    classifier = 8 * 3 + 3                                  # reduce_concat [3]: 1 x 8 channels
    net = DiscreteNetwork(Genotype.from_dict(GENOTYPE), space)
    assert sum(p.numel() for p in net.parameters()) == stem + normal + reduce + classifier == 1927


def test_genotype_spec_holds_the_genotype_itself(tmp_path):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(GENOTYPE))
    assert genotype(tiny_space(), str(path)) == {"kind": "genotype", "genotype": GENOTYPE}


@pytest.mark.parametrize("content,expected", [
    (None, "cannot read genotype file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"normal": [], "reduce": []}), "missing keys ['normal_concat']"),
    (json.dumps({**GENOTYPE, "normal": [[["conv_9x9", 0]], [["conv_3x3", 1]]]}), "'conv_9x9'"),
    (json.dumps({**GENOTYPE, "reduce": [[["dil_conv_3x3", 0]], [["conv_3x3", 1]]]}), "not in search_space.ops"),
    (json.dumps({**GENOTYPE, "normal": [[["conv_3x3", 0]]]}), "n_nodes=2"),
])
def test_bad_genotype_file_is_one_line_naming_model_path(tmp_path, content, expected):
    path = tmp_path / "genotype.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        genotype(tiny_space(), str(path))
    msg = str(err.value)
    assert msg.startswith(f"model.path={str(path)!r}: ") and expected in msg and "\n" not in msg


def test_genotype_without_path_says_how_to_give_one():
    with pytest.raises(ConfigError, match=r"model.path=<run dir>/genotype.json"):
        genotype(tiny_space(), None)


def test_every_model_composes_and_builds(tmp_path):
    supernet = build_trainer(_compose(["experiment=smoke", "device=cpu"]), tmp_path / "a")
    assert isinstance(supernet.net, SearchNetwork) and supernet.alphas
    c4 = build_trainer(_compose(["experiment=smoke", "device=cpu", "model=conv4", "model.channels=6"]),
                       tmp_path / "b")
    assert isinstance(c4.net, Conv4) and c4.net.cfg.channels == 6 and not c4.alphas and c4.opt_alphas is None
    for t in (supernet, c4):
        t.close()


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One smoke-sized metanas-train run per model; the genotype run retrains the supernet
    run's genotype.json from a copy that is deleted afterwards."""
    root = tmp_path_factory.mktemp("runs")
    procs = {"supernet": run_train(f"hydra.run.dir={root / 'supernet'}", cwd=root)}
    assert procs["supernet"].returncode == 0, procs["supernet"].stdout[-3000:]
    copy = root / "found.json"
    shutil.copy(root / "supernet" / "genotype.json", copy)
    procs["conv4"] = run_train("model=conv4", "model.match_parameters=supernet",
                               f"hydra.run.dir={root / 'conv4'}", cwd=root)
    procs["genotype"] = run_train("model=genotype", f"model.path={copy}",
                                  f"hydra.run.dir={root / 'genotype'}", cwd=root)
    copy.unlink()  # checkpoints must not need it
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stdout[-3000:])
    return root, procs


@pytest.mark.slow
def test_each_model_trains_through_the_cli(runs):
    root, procs = runs
    metrics = {m: json.loads((root / m / "metrics.json").read_text()) for m in procs}
    found = json.loads((root / "supernet" / "genotype.json").read_text())
    assert metrics["supernet"]["model"] == {"kind": "supernet"}
    assert metrics["supernet"]["architecture_diversity"] and metrics["supernet"]["architecture_gain"]
    assert metrics["genotype"]["model"] == {"kind": "genotype", "genotype": found}
    supernet_count = metrics["supernet"]["parameters"]
    channels = closest_channels(supernet_count, 1, 5, 4)
    assert metrics["conv4"]["model"] == {"kind": "conv4", "channels": channels, "n_blocks": 4}
    assert metrics["conv4"]["parameters"] == conv4_hand_count(1, 5, channels, 4)
    assert f"{channels} channels, {conv4_hand_count(1, 5, channels, 4)} weights" in procs["conv4"].stdout
    for m in ("conv4", "genotype"):
        assert metrics[m]["n_tasks"] == 3 and 0.0 <= metrics[m]["accuracy"] <= 1.0
        assert metrics[m]["architecture_diversity"] is None and metrics[m]["architecture_gain"] is None
        assert not (root / m / "genotype.json").exists() and not (root / m / "task_genotypes.json").exists()
        assert f"{metrics[m]['parameters']} weights and 0 alphas" in procs[m].stdout
        header = (root / m / "train_log.csv").read_text().splitlines()[0]
        assert "op/" not in header and "entropy" not in header
        state = load_checkpoint(root / m / "checkpoints" / "last.ckpt")
        assert state["model"] == metrics[m]["model"] and state["alphas"] == {}
    assert f"{supernet_count} weights and" in procs["supernet"].stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """support/ (5 classes x 1 image) and query/ (5 x 2, labelled)."""
    root = tmp_path_factory.mktemp("data")
    make_shapes_folder(root / "all", n_classes=5, n_images=3, seed=2)
    for c in sorted(p.name for p in (root / "all").iterdir() if not p.name.startswith(".")):
        files = sorted((root / "all" / c).iterdir())
        for sub, part in (("support", files[:1]), ("query", files[1:])):
            (root / sub / c).mkdir(parents=True)
            for f in part:
                shutil.copy(f, root / sub / c / f.name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", ["supernet", "conv4", "genotype"])
def test_metanas_adapt_on_each_checkpoint(runs, folders, model, tmp_path):
    root, _ = runs
    ckpt = root / model / "checkpoints" / "best.ckpt"
    meta = load_meta_model(ckpt)
    assert meta.model == json.loads((root / model / "metrics.json").read_text())["model"]

    sampled = adapt_command(_compose([f"checkpoint={ckpt}", "task=omniglot", "n_tasks=2",
                                      "finetune_steps=1", "device=cpu"], "adapt"), tmp_path / "sampled")
    written = {p.name for p in (tmp_path / "sampled").iterdir()}
    assert sampled["model"] == model and sampled["n_tasks"] == 2
    assert 0.0 <= sampled["discrete"]["accuracy"] <= 1.0
    if model == "supernet":
        assert sampled["supernet"] is not None and sampled["unique_genotypes"] >= 1
        assert {"genotype.json", "task_genotypes.json", "cells.png"} <= written
    else:
        assert sampled["supernet"] is None and sampled["architecture_diversity"] is None
        assert "task_genotypes.json" not in written
        assert ("genotype.json" in written) == (model == "genotype")

    out = tmp_path / "support"
    mine = adapt_command(_compose([f"checkpoint={ckpt}", f"support={folders / 'support'}",
                                   f"query={folders / 'query'}", "finetune_steps=1", "device=cpu"],
                                  "adapt"), out)
    written = {p.name for p in out.iterdir()}
    assert {"metrics.json", "predictions.csv", "model.pt", "model.onnx", "model_info.json"} <= written
    assert ("genotype.json" in written) == (model != "conv4")
    assert (mine["supernet"] is None) == (model != "supernet")
    info = json.loads((out / "model_info.json").read_text())
    if model == "conv4":
        assert info["genotype"] is None and info["parameters"] == conv4_hand_count(1, 5, meta.model["channels"], 4)
    # the exported TorchScript model gives what predictions.csv says
    from metanas.export import load_torchscript
    from metanas.tasks import load_image_folder
    exported, _ = load_torchscript(out / "model.pt")
    data = load_image_folder(folders / "query", 28, 1, cache=False)
    with torch.no_grad():
        probs = torch.softmax(exported(torch.from_numpy(data.images.astype("float32") / 255)), -1)
    lines = (out / "predictions.csv").read_text().splitlines()[1:]
    assert [line.split(",")[1] for line in lines] == [data.class_names[i] for i in probs.argmax(-1).tolist()]


@pytest.mark.slow
def test_resume_with_another_model_is_refused(runs, tmp_path):
    root, _ = runs
    proc = run_train("model=conv4", f"resume={root / 'supernet' / 'checkpoints' / 'last.ckpt'}",
                     f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-3000:]
    error = [line for line in proc.stdout.splitlines() if line.startswith("metanas-train: error:")]
    assert len(error) == 1 and "Traceback" not in proc.stdout
    assert "holds the supernet" in error[0] and "asks for conv4 (channels=64, n_blocks=4)" in error[0]
    assert not (tmp_path / "again" / "metrics.json").exists()


@pytest.mark.slow
def test_checkpoint_without_model_field_loads_as_supernet(runs, tmp_path):
    root, _ = runs
    state = load_checkpoint(root / "supernet" / "checkpoints" / "last.ckpt")
    del state["model"]
    old = tmp_path / "old.ckpt"
    save_checkpoint(old, state)
    assert load_meta_model(old).model == {"kind": "supernet"}
    trainer = build_trainer(_compose([*SMOKE, "device=cpu"]), tmp_path / "a")
    conv = build_trainer(_compose([*SMOKE, "device=cpu", "model=conv4"]), tmp_path / "b")
    try:
        trainer.resume(old)
        assert trainer.step == 2
        with pytest.raises(CheckpointError, match="holds the supernet, this run asks for conv4"):
            conv.resume(old)
        # and the other way round: a conv-4 checkpoint refused by a supernet run
        with pytest.raises(CheckpointError,
                           match=r"holds conv4 \(channels=\d+, n_blocks=4\), this run asks for the supernet"):
            trainer.resume(root / "conv4" / "checkpoints" / "last.ckpt")
    finally:
        trainer.close()
        conv.close()


@pytest.mark.slow
def test_missing_genotype_file_through_the_cli(tmp_path):
    proc = run_train("model=genotype", f"model.path={tmp_path / 'nope.json'}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    error = [line for line in proc.stdout.splitlines() if line.startswith("metanas-train: error:")]
    assert len(error) == 1 and "model.path=" in error[0] and "nope.json" in error[0]
    assert "Traceback" not in proc.stdout and not (tmp_path / "run" / "metrics.json").exists()


def test_resume_refusal_and_old_checkpoints_in_process(tmp_path):
    """Without training: a supernet trainer's checkpoint, with and without its model field."""
    base = ["experiment=smoke", "device=cpu", "trainer.meta_steps=0"]
    supernet = build_trainer(_compose(base), tmp_path / "a")
    conv = build_trainer(_compose([*base, "model=conv4", "model.channels=6"]), tmp_path / "b")
    try:
        path = supernet.save()
        assert load_checkpoint(path)["model"] == {"kind": "supernet"}
        with pytest.raises(CheckpointError) as err:
            conv.resume(path)
        assert str(err.value) == (
            f"checkpoint {path} holds the supernet, this run asks for conv4 (channels=6, n_blocks=4); "
            "resume with the model it was trained with (model=supernet and its settings) or start a "
            "new run without resume")
        state = load_checkpoint(path)
        del state["model"]  # as written before the model group
        old = tmp_path / "old.ckpt"
        save_checkpoint(old, state)
        supernet.resume(old)
        with pytest.raises(CheckpointError, match="holds the supernet"):
            conv.resume(old)
        conv_path = conv.save()
        conv.resume(conv_path)  # its own model resumes
        with pytest.raises(CheckpointError, match=r"holds conv4 \(channels=6, n_blocks=4\), this run asks for the supernet"):
            supernet.resume(conv_path)
    finally:
        supernet.close()
        conv.close()

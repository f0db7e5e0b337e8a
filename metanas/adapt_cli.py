"""``metanas-adapt``: adapt a meta-trained checkpoint to new data and export the task's model.

Two modes (``conf/adapt.yaml``):

Checkpoints of every model (``model=supernet``, ``conv4``, ``genotype``) are accepted; a
network without alphas adapts its weights alone, is its own task network, and has no supernet
accuracy (null) and, for conv-4, no genotype files.

* **your task** (``support=<folder of class sub-folders>``, optional ``query=<folder>``):
  adapts weights and alphas on the support images, derives the task's genotype, builds its
  discrete network and writes ``genotype.json``, ``cells.png``, ``metrics.json``,
  ``predictions.csv`` (for a query folder: file, predicted class, class probabilities, and
  the true class when the query folder has class sub-folders, in which case ``metrics.json``
  holds the accuracy with its 95% Wilson interval), ``model.pt`` (TorchScript), ``model.onnx``
  and ``model_info.json`` (parameters, FLOPs per image, input description, class names).
  The exported model freezes its BatchNorm statistics at the support set's
  (``export_norm=support``, the default; ``batch`` keeps batch statistics), and
  ``predictions.csv`` holds its predictions, so a deployed model gives what the file shows.
* **sampled tasks** (``data=<image folder>`` or ``task=<sampler config>``, ``n_tasks=N``):
  accuracy of the adapted supernet and of the discrete task networks, mean and 95% interval
  over the tasks, in ``metrics.json``; every task's genotype in ``task_genotypes.json``; the
  meta-architecture in ``genotype.json`` and ``cells.png``.

Everything is computed before anything is written, and every file is written atomically; bad
input (settings are checked first, Hydra's own configuration errors included) ends with
``metanas-adapt: error: <what and how to fix it>`` and exit status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metanas.tasks import ImageFolderTasks, check_sampler
from metanas.tasks.core import check_int
from metanas.tasks.image_folder import (
    is_image_file,
    list_class_folders,
    load_image_folder,
    load_images,
    pixel_normalisation,
)

from .adaptation import (
    AdaptedTask,
    MetaModel,
    adapt_support,
    check_fits,
    evaluate_tasks,
    load_meta_model,
    wilson_ci95,
)
from . import rundir
from .io import resolve_device
from .draw import draw_genotype
from .errors import ConfigError, DataError, MetaNASError
from .hydra_utils import build, output_dir, run_console
from .export import (
    EXPORT_NORMS,
    SUPPORT,
    StandaloneClassifier,
    count_parameters,
    flops_per_image,
    onnx_bytes,
    torchscript_bytes,
)
from .engines import default_workers, share_cores
from .memory import check_budget
from .pretrained import default_checkpoint


log = logging.getLogger(__name__)


class _Pixels:
    """uint8 images -> float32 tensors with the configured normalisation."""

    def __init__(self, channels: int, cfg: DictConfig) -> None:
        mean = None if cfg.mean is None else list(cfg.mean)
        std = None if cfg.std is None else list(cfg.std)
        self.scale, self.shift, self.std = pixel_normalisation(channels, bool(cfg.invert), mean, std)

    def __call__(self, images: np.ndarray, device: torch.device) -> torch.Tensor:
        x = images.astype(np.float32) / np.float32(255)
        c = (-1, 1, 1)
        x = (x * self.scale.reshape(c) - self.shift.reshape(c)) / self.std.reshape(c)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)

    @staticmethod
    def unit(images: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 images -> float32 in [0, 1], as the exported model takes them."""
        return torch.from_numpy(images.astype(np.float32) / np.float32(255)).to(device)


def _check_settings(cfg: DictConfig) -> None:
    """Type and range of every count and switch of ``conf/adapt.yaml``, before anything loads.

    Raises:
        ConfigError: naming the setting, its value and what is allowed.
    """
    def count(key: str, lowest: int, null: str | None = None) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None and null is not None:
            return
        check_int(key, value, lowest,
                  fix=f"set {key} to a whole number >= {lowest}" + (f" (or null: {null})" if null else ""))

    count("k_shot", 1, "every support image; 1 shot with data=")
    count("q_query", 1)
    count("n_tasks", 1)
    count("finetune_steps", 0)
    count("image_size", 1, "the checkpoint's size")
    count("seed", 0)
    count("inner.steps", 0, "the checkpoint's")
    for key in ("inner.lr_weights", "inner.lr_alphas"):
        value = OmegaConf.select(cfg, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ConfigError(f"{key}={value!r} is not a number >= 0; set {key} to a learning rate "
                              "such as 0.1 (or null: the checkpoint's)")
    check_budget(OmegaConf.select(cfg, "memory_budget_gb"), "memory_budget_gb")
    for key in ("export", "invert"):
        value = cfg.get(key)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not a boolean; set {key}=true or {key}=false")
    if cfg.get("export_norm") not in EXPORT_NORMS:
        raise ConfigError(
            f"export_norm={cfg.get('export_norm')!r} is unknown; use export_norm=support (BatchNorm "
            "statistics of the support set, frozen: each image classified on its own) or "
            "export_norm=batch (statistics of each batch)"
        )


def _load_model(cfg: DictConfig, device: torch.device) -> MetaModel:
    path = cfg.get("checkpoint")
    if path in (None, ""):
        path = default_checkpoint()
        log.info("checkpoint: the bundled Omniglot 5-way 1-shot supernet (%s; see its README); "
                 "pass checkpoint=<run dir>/%s/%s for your own", path, rundir.CHECKPOINTS, rundir.BEST_CKPT)
    inner = OmegaConf.to_container(cfg.inner, resolve=True) if cfg.inner is not None else {}
    return load_meta_model(path, device, inner)


def _image_size(cfg: DictConfig, model: MetaModel) -> int:
    return int(cfg.image_size or model.image_size or 28)


# ----------------------------------------------------------------------------- mode A
def _support(cfg: DictConfig, model: MetaModel, size: int):
    channels = model.space.in_channels
    data = load_image_folder(cfg.support, size, channels, cache=False, what="support folder")
    n = model.space.n_classes
    check_fits(model, (channels, size, size), len(data.class_names), f"support folder {cfg.support}",
               fixes={"n_way": f"give the support folder {n} class sub-folders (one per class)",
                      "image_size": f"set image_size={model.image_size} (or null: the checkpoint's size)"})
    rows = data.rows_of()
    if cfg.k_shot is not None:
        k = int(cfg.k_shot)
        small = [(n, len(r)) for n, r in zip(data.class_names, rows) if len(r) < k]
        if small:
            raise DataError(
                f"support folder {cfg.support}: class(es) {small} have fewer than k_shot={k} "
                "images; add images or lower k_shot (k_shot=null uses every image)"
            )
        rows = [r[:k] for r in rows]
    index = np.concatenate(rows)
    return data.images[index], data.labels[index], data.class_names


def _query(cfg: DictConfig, size: int, channels: int, class_names: tuple[str, ...]):
    """(images, labels or None, file names) of the query folder."""
    root = Path(cfg.query).expanduser()
    if not root.is_dir():
        raise DataError(f"query folder {root} does not exist; pass query=<folder of images>")
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        data = load_image_folder(root, size, channels, cache=False, what="query folder")
        unknown = sorted(set(data.class_names) - set(class_names))
        if unknown:
            raise DataError(
                f"query folder {root} has class folder(s) {unknown} that the support set does not "
                f"have ({list(class_names)}); name query class folders like the support ones"
            )
        remap = np.array([class_names.index(n) for n in data.class_names])
        return data.images, remap[data.labels], list(data.files)
    files = sorted(p for p in root.iterdir() if is_image_file(p))
    if not files:
        raise DataError(f"query folder {root} holds no images; put the images to classify there")
    return load_images(files, size, channels), None, [f.name for f in files]


def _exported_model(task: AdaptedTask, pixels: _Pixels, channels: int, support: torch.Tensor,
                    norm: str) -> StandaloneClassifier:
    """The model ``model.pt`` / ``model.onnx`` hold (on the support images' device): the task
    network with the input normalisation, its BatchNorm statistics frozen at the support
    set's (``norm="support"``) or taken from each batch (``"batch"``)."""
    return StandaloneClassifier(
        task.discrete, channels, scale=pixels.scale.tolist(), shift=pixels.shift.tolist(),
        std=pixels.std.tolist(), support=support if norm == SUPPORT else None,
    ).to(support.device)


_NORM_NOTES = {
    "support": "BatchNorm statistics of the {n} support images, frozen: every image is classified "
               "on its own, whatever the batch",
    "batch": "batch statistics: classify several images in one batch; a prediction depends on the batch",
}


def _export(model: StandaloneClassifier, task: AdaptedTask, pixels: _Pixels, channels: int, size: int,
            class_names, n_support: int, cfg) -> dict[str, Any]:
    model = model.cpu()
    example = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(0))
    info = {
        "class_names": list(class_names),
        "input": {"shape": [channels, size, size], "range": [0.0, 1.0],
                  "normalisation": {"scale": pixels.scale.tolist(), "shift": pixels.shift.tolist(),
                                    "std": pixels.std.tolist()},
                  "note": _NORM_NOTES[model.norm].format(n=n_support)},
        "export_norm": model.norm,
        "genotype": None if task.genotype is None else task.genotype.to_dict(),
        "parameters": count_parameters(model),
        "flops_per_image": flops_per_image(model, example),
    }
    files: dict[str, Any] = {rundir.MODEL_INFO: info}
    if cfg.export:
        files[rundir.TORCHSCRIPT] = torchscript_bytes(model, example, info)
        try:
            import onnx  # noqa: F401 - only to know whether the ONNX exporter can run

            files[rundir.ONNX] = onnx_bytes(model, example)
        except ImportError:
            log.warning("onnx is not installed: %s skipped (pip install 'metanas[export]')", rundir.ONNX)
    return files


def _mode_support(cfg: DictConfig, model: MetaModel, device: torch.device) -> tuple[dict, dict[str, Any]]:
    size = _image_size(cfg, model)
    channels = model.space.in_channels
    images, labels, class_names = _support(cfg, model, size)
    pixels = _Pixels(channels, cfg)
    sx, sy = pixels(images, device), torch.from_numpy(labels).to(device)
    query = _query(cfg, size, channels, class_names) if cfg.query is not None else None
    task = adapt_support(model, sx, sy, int(cfg.finetune_steps))
    exported = _exported_model(task, pixels, channels, pixels.unit(images, device), str(cfg.export_norm))
    metrics: dict[str, Any] = {
        "mode": "support", "checkpoint": str(model.path), "support": str(cfg.support),
        "class_names": list(class_names), "support_images": len(labels),
        "image_size": size, "inner_steps": model.inner.steps, "finetune_steps": int(cfg.finetune_steps),
        "export_norm": exported.norm,
    }
    files: dict[str, Any] = {}
    with torch.no_grad():
        metrics["support_accuracy"] = float((task.discrete_logits(sx).argmax(-1) == sy).float().mean())
    if query is not None:
        q_images, q_labels, q_files = query
        qx = pixels(q_images, device)
        # the predictions of the exported model (what a deployed model.pt / model.onnx gives)
        with torch.no_grad():
            probs = torch.softmax(exported(pixels.unit(q_images, device)), -1).cpu()
        pred = probs.argmax(-1).numpy()
        files[rundir.PREDICTIONS] = [
            {"file": f, "predicted": class_names[pred[i]],
             **{f"p_{c}": f"{p:.6f}" for c, p in zip(class_names, probs[i].tolist())},
             **({"label": class_names[q_labels[i]]} if q_labels is not None else {})}
            for i, f in enumerate(q_files)
        ]
        metrics["query"] = str(cfg.query)
        metrics["query_images"] = len(q_files)
        if q_labels is not None:
            # transductive (one batch of all query images, batch statistics): the task network
            # and the adapted supernet; "exported": the exported model, as predictions.csv
            # (a network without alphas has no supernet: null)
            dis_pred = task.discrete_logits(qx).argmax(-1).cpu().numpy()
            sup_pred = task.supernet_logits(model, qx).argmax(-1).cpu().numpy() if model.alphas else None
            for name, p in (("exported", pred), ("discrete", dis_pred), ("supernet", sup_pred)):
                if p is None:
                    metrics[name] = None
                    continue
                acc, low, high = wilson_ci95(int((p == q_labels).sum()), len(q_labels))
                metrics[name] = {"accuracy": acc, "ci95_low": low, "ci95_high": high,
                                 "ci95": (high - low) / 2, "interval": "wilson"}
            metrics["accuracy"] = metrics["exported"]["accuracy"]
    files.update(_export(exported, task, pixels, channels, size, class_names, len(labels), cfg))
    metrics.update({k: files[rundir.MODEL_INFO][k] for k in ("parameters", "flops_per_image")})
    metrics["model"] = model.model["kind"]
    if task.genotype is not None:  # conv-4 has none
        files[rundir.GENOTYPE] = task.genotype.to_dict()
        files[rundir.CELLS] = draw_genotype(task.genotype, title="task architecture")
    return metrics, files


# ----------------------------------------------------------------------------- mode B
def _sampled_fixes(cfg: DictConfig, model: MetaModel) -> dict[str, str]:
    """How to fix a sampler that does not fit the checkpoint, naming only settings there are:
    with data=, the command's image_size (channels and ways come from the checkpoint); with
    task=, the sampler config's own keys where it has them."""
    if cfg.data is not None:
        return {"image_size": f"set image_size={model.image_size} (or null: the checkpoint's size)"}
    wanted = {"channels": model.space.in_channels, "n_way": model.space.n_classes,
              "image_size": model.image_size}
    generic = {"channels": f"make the task sampler give {wanted['channels']}-channel images",
               "n_way": f"make the task sampler give {wanted['n_way']}-way tasks",
               "image_size": f"make the task sampler give {wanted['image_size']}x{wanted['image_size']} images"}
    task = cfg.get("task") or {}
    return {k: f"set task.{k}={wanted[k]}" if k in task else generic[k] for k in wanted}


def _mode_sampled(cfg: DictConfig, model: MetaModel, device: torch.device) -> tuple[dict, dict[str, Any]]:
    if cfg.get("task") is not None and cfg.data is not None:
        raise ConfigError("give either data=<image folder> or task=<sampler config>, not both")
    if cfg.data is not None:
        size = _image_size(cfg, model)
        n, found = model.space.n_classes, len(list_class_folders(cfg.data, "image folder"))
        if found < n:
            other = f", or use a checkpoint meta-trained for {found}-way tasks" if found >= 2 else ""
            raise DataError(
                f"image folder {cfg.data} has {found} class sub-folder{'s' if found != 1 else ''} but "
                f"checkpoint {model.path} adapts to {n}-way tasks; give it at least {n} class "
                f"sub-folders{other}"
            )
        sampler = ImageFolderTasks(
            cfg.data, n_way=model.space.n_classes, k_shot=int(cfg.k_shot or 1),
            q_query=int(cfg.q_query), image_size=size, channels=model.space.in_channels,
            split_fractions=[0.0, 0.0, 1.0], invert=bool(cfg.invert),
            mean=None if cfg.mean is None else list(cfg.mean),
            std=None if cfg.std is None else list(cfg.std),
        )
        split, what = "test", f"image folder {cfg.data}"
        check_sampler(sampler, splits=(split,))  # all its classes are in the test split
    else:
        split = str(cfg.split)
        sampler = check_sampler(build(cfg.task, "the task sampler (task=...)"), splits=(split,))
        what = f"task sampler {type(sampler).__name__}"
    check_fits(model, tuple(sampler.input_shape), int(sampler.n_way), what, _sampled_fixes(cfg, model))
    workers = default_workers(device)
    share_cores(workers, device)
    result = evaluate_tasks(model, sampler, split, int(cfg.n_tasks),
                            np.random.default_rng(int(cfg.seed)), int(cfg.finetune_steps), device,
                            workers=workers, memory_budget_gb=OmegaConf.select(cfg, "memory_budget_gb"))
    genotypes = result.pop("genotypes")
    accs = result.pop("accuracies")
    div = result.pop("diversity")
    meta = model.genotype
    metrics = {
        "mode": "sampled", "checkpoint": str(model.path), "model": model.model["kind"],
        "dataset": what, "split": split,
        "n_way": sampler.n_way, "k_shot": sampler.k_shot, "q_query": sampler.q_query,
        "inner_steps": model.inner.steps, "finetune_steps": int(cfg.finetune_steps),
        "accuracy": result["discrete"]["accuracy"], "ci95": result["discrete"]["ci95"],
        **result, "interval": "normal approximation over tasks",
        # null for a network without alphas (no task genotypes)
        "changed_share": div.get("changed_share"),
        "unique_genotypes": int(div["unique_genotypes"]) if div else None,
        "architecture_diversity": div or None,
    }
    files: dict[str, Any] = {}
    if genotypes:
        files[rundir.TASK_GENOTYPES] = [
            {"task": i, "supernet_accuracy": a, "discrete_accuracy": d, "genotype": g.to_dict()}
            for i, (a, d, g) in enumerate(zip(accs["supernet"], accs["discrete"], genotypes))]
    if meta is not None:  # conv-4 has no architecture to show
        files[rundir.GENOTYPE] = meta.to_dict()
        files[rundir.CELLS] = draw_genotype(meta, title="meta-architecture")
    return metrics, files


def adapt_command(cfg: DictConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``metanas-adapt`` on a composed ``adapt`` config; returns the metrics written.

    Raises:
        MetaNASError: bad input (nothing is written then).
    """
    out = Path(out_dir) if out_dir is not None else output_dir(cfg.out)
    _check_settings(cfg)
    device = resolve_device(cfg.device)
    model = _load_model(cfg, device)
    if cfg.support is not None:
        if cfg.data is not None or cfg.get("task") is not None:
            raise ConfigError("support= adapts to your own task; do not combine it with data= or task=")
        metrics, files = _mode_support(cfg, model, device)
    elif cfg.data is not None or cfg.get("task") is not None:
        if cfg.query is not None:
            raise ConfigError("query= needs support= (the labelled images to adapt to)")
        metrics, files = _mode_sampled(cfg, model, device)
    else:
        raise ConfigError(
            "nothing to adapt to: pass support=<folder of class sub-folders> (your task), or "
            "data=<image folder> / task=<sampler config> with n_tasks=N (accuracy over tasks)"
        )
    rundir.write(out, {**files, rundir.METRICS: metrics})
    return metrics


def _summary(metrics: dict[str, Any], out: Path) -> str:
    s = metrics.get("supernet")
    if "exported" in metrics:
        e, d = metrics["exported"], metrics["discrete"]
        sup = "" if s is None else f", {100 * s['accuracy']:.2f} % (adapted supernet)"
        return (f"accuracy {100 * e['accuracy']:.2f} +- {100 * e['ci95']:.2f} % (exported model, "
                f"export_norm={metrics['export_norm']}); in one batch: {100 * d['accuracy']:.2f} % (task "
                f"network){sup}; results in {out}")
    if "discrete" in metrics:
        d = metrics["discrete"]
        sup = "" if s is None else f", {100 * s['accuracy']:.2f} +- {100 * s['ci95']:.2f} % (adapted supernet)"
        return (f"accuracy {100 * d['accuracy']:.2f} +- {100 * d['ci95']:.2f} % (task network)"
                f"{sup}; results in {out}")
    return f"adapted to {metrics['support_images']} support images; results in {out}"


@hydra.main(version_base="1.3", config_path="pkg://metanas.conf", config_name="adapt")
def _main(cfg: DictConfig) -> None:
    try:
        metrics = adapt_command(cfg)
    except MetaNASError as exc:
        log.error("%s", exc)
        print(f"metanas-adapt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(_summary(metrics, output_dir(cfg.out)))


def adapt_entry() -> None:
    """Console script ``metanas-adapt`` (also ``python -m metanas.adapt_cli``); Hydra's own
    configuration errors end as one-line errors with exit status 2 too
    (:func:`metanas.hydra_utils.run_console`)."""
    run_console(_main, "metanas-adapt", "adapt")


__all__ = ["adapt_command", "adapt_entry"]


if __name__ == "__main__":
    adapt_entry()

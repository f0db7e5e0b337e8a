"""miniImageNet few-shot tasks from either of its two community formats, and their download.

miniImageNet (Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016) with
the class split of Ravi & Larochelle ("Optimization as a Model for Few-Shot Learning", ICLR
2017): 100 ImageNet classes of 600 images, 64 for meta-train, 16 for meta-val, 20 for
meta-test. Two formats are common and both are read from ``root``:

* ``csv`` (Ravi & Larochelle's release, github.com/twitter/meta-learning-lstm): ``train.csv``,
  ``val.csv``, ``test.csv`` with the header ``filename,label`` and the images in ``images/``
  (any size; resized here).
* ``pickle`` (the arrays distributed with learn2learn, Arnold et al. 2020, and mirrored on
  Zenodo record 7978538): ``mini-imagenet-cache-{train,val,test}.pkl`` (``validation`` is
  accepted for ``val``), each a dict with ``image_data``: uint8 ``(N, 84, 84, 3)`` and
  ``class_dict``: ``{label: [row indices]}``. Pickles are read with a restricted unpickler that
  only rebuilds numpy arrays, lists, dicts and strings, so a tampered file cannot run code.

Pixels become float32 ``x / 255`` in [0, 1], optionally normalised per channel with ``mean``
and ``std``. Splits are decoded on first use and, for the CSV format, cached as ``.npz``
(:func:`metanas.tasks.core.load_cached`, as for image folders: keyed by file sizes and times,
written atomically, rebuilt when unreadable or of the wrong shape or dtype, the older caches
of the same split and settings removed when a new one is written).

Download (pickle format, about 1.1 GB)::

    python -m metanas.tasks.miniimagenet --root ~/data/miniimagenet
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import pickle
import sys
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
from PIL import Image

from metanas.errors import ConfigError, DataError

from .base import SPLITS, Split, check_split
from .core import PixelNorm, PoolSampler, RaggedPool, check_counts, check_int, check_split_sizes, load_cached
from .image_folder import image_array, load_images

__all__ = [
    "DEFAULT_URLS", "MiniImageNetTasks", "detect_format", "download", "download_miniimagenet",
    "read_split_csv", "safe_load_pickle",
]

log = logging.getLogger(__name__)

#: Public mirror of the pickled arrays (learn2learn's Zenodo record 7978538).
DEFAULT_URLS: dict[str, str] = {
    "train": "https://zenodo.org/record/7978538/files/mini-imagenet-cache-train.pkl",
    "val": "https://zenodo.org/record/7978538/files/mini-imagenet-cache-validation.pkl",
    "test": "https://zenodo.org/record/7978538/files/mini-imagenet-cache-test.pkl",
}
_PICKLE_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_DOWNLOAD_HINT = (
    "download it with `python -m metanas.tasks.miniimagenet --root {root}` (pickled arrays, "
    "about 1.1 GB), or put Ravi & Larochelle's train.csv/val.csv/test.csv and images/ there, "
    "or set task.root (or the METANAS_DATA environment variable) to where it is"
)
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------- reading
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers (no arbitrary code)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "dict"),
        ("builtins", "list"),
    })

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def safe_load_pickle(path: str | os.PathLike) -> object:
    """Load a pickle of numpy arrays and containers without executing arbitrary code.

    Raises:
        DataError: unreadable, truncated, or holding anything else than arrays/containers.
    """
    try:
        with open(path, "rb") as fh:
            return _ArrayUnpickler(fh, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path} cannot be read as a miniImageNet pickle ({type(exc).__name__}: {exc}); "
            "delete it and download it again"
        ) from exc


def detect_format(root: Path) -> str:
    """``"pickle"`` or ``"csv"``, by the files present in ``root``.

    Raises:
        DataError: neither format is there (the message says how to download it).
    """
    if _pickle_path(root, "train") is not None:
        return "pickle"
    if (root / "train.csv").is_file():
        return "csv"
    raise DataError(
        f"miniImageNet not found in {root} (no mini-imagenet-cache-train.pkl, no train.csv); "
        + _DOWNLOAD_HINT.format(root=root)
    )


def _pickle_path(root: Path, split: str) -> Path | None:
    for name in _PICKLE_NAMES[split]:
        p = root / f"mini-imagenet-cache-{name}.pkl"
        if p.is_file():
            return p
    return None


def read_split_csv(path: Path) -> tuple[list[str], list[str]]:
    """``(filenames, labels)`` of a Ravi & Larochelle split file (header ``filename,label``).

    Raises:
        DataError: missing file, wrong header, or an empty file.
    """
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; miniImageNet's CSV format needs "
                        "train.csv, val.csv and test.csv next to images/")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"{path} must start with the header 'filename,label' (Ravi & Larochelle's format)")
    body = [r for r in rows[1:] if r]
    if not body or any(len(r) < 2 for r in body):
        raise DataError(f"{path} has no rows or a row without a label; each row is filename,label")
    return [r[0].strip() for r in body], [r[1].strip() for r in body]


def _resize_hwc(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` -> uint8 ``(N, channels, S, S)``."""
    if images.shape[1] == images.shape[2] == image_size and channels == 3:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return load_images(images, image_size, channels, lambda a, s, c: image_array(Image.fromarray(a), s, c))


class _Split(NamedTuple):
    """One split's decoded examples: flat images, per-class rows and class names."""

    images: np.ndarray
    rows: list[np.ndarray]
    names: list[str]


def _load_pickle_split(path: Path, image_size: int, channels: int) -> _Split:
    data = safe_load_pickle(path)
    if not isinstance(data, Mapping) or "image_data" not in data or "class_dict" not in data:
        raise DataError(f"{path} is not a miniImageNet cache: it needs the keys 'image_data' and 'class_dict'")
    images = np.asarray(data["image_data"])
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{path}: image_data has shape {images.shape} and dtype {images.dtype}; expected uint8 (N, H, W, 3)"
        )
    names, rows = [], []
    for label, idx in sorted(data["class_dict"].items()):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
            raise DataError(f"{path}: class_dict[{label!r}] indexes rows outside image_data; the file is damaged")
        names.append(str(label))
        rows.append(idx)
    return _Split(_resize_hwc(images, image_size, channels), rows, names)


def _load_csv_split(root: Path, split: str, image_size: int, channels: int, cache: bool) -> _Split:
    files, labels = read_split_csv(root / f"{split}.csv")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir} does not exist; the CSV format keeps every image in root/images/")
    paths = [image_dir / f for f in files]
    missing = [str(p.name) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) listed in {split}.csv are missing from {image_dir}, e.g. "
            f"{missing[:3]}; complete the images folder"
        )
    names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    lab = np.array([index[s] for s in labels], dtype=np.int64)
    rows = [np.flatnonzero(lab == i) for i in range(len(names))]
    stats = [(f, p.stat().st_size, p.stat().st_mtime_ns) for f, p in zip(files, paths)]
    key = [_CACHE_VERSION, split, image_size, channels, stats]
    layout = {"images": (np.dtype(np.uint8), (len(paths), channels, image_size, image_size))}
    scope = [_CACHE_VERSION, str(root.resolve()), split, image_size, channels]
    arrays = load_cached(root / ".metanas_cache" if cache else None, split, key, layout,
                         lambda: {"images": load_images(paths, image_size, channels)}, scope)
    return _Split(arrays["images"], rows, names)


# ---------------------------------------------------------------------------------- sampler
class MiniImageNetTasks(PoolSampler):
    """N-way K-shot tasks from miniImageNet (see the module docstring for the formats).

    Tasks are float32, ``support_x`` ``(n_way * k_shot, C, S, S)`` and ``query_x``
    ``(n_way * q_query, C, S, S)``, normalised by :attr:`pixels`.

    Args:
        root: the dataset folder.
        n_way, k_shot, q_query: the episodes' shape.
        image_size: side of the square images (84 in the literature).
        channels: 3 (RGB) or 1 (grey).
        format: ``"auto"``, ``"pickle"`` or ``"csv"``.
        mean, std: per-channel normalisation after scaling to [0, 1].
        cache: cache decoded CSV-format images as ``.npz`` under ``root/.metanas_cache``.

    Raises:
        DataError: the data is absent (with the download command), incomplete or damaged, or
            a class has fewer than ``k_shot + q_query`` images or a split fewer than ``n_way``
            classes. The CSV format's class lists are checked here for every split; the
            pickles' when each is decoded (on first use; :func:`~metanas.tasks.check_sampler`
            draws from each split the trainer uses when it is built).
    """

    def __init__(
        self, root: str | os.PathLike | None = None, n_way: int = 5, k_shot: int = 1, q_query: int = 15,
        image_size: int = 84, channels: int = 3, format: str = "auto", mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, cache: bool = True,
    ) -> None:
        if root in (None, ""):
            raise ConfigError("task.root is not set; pass the miniImageNet folder")
        self.n_way, self.k_shot, self.q_query = check_counts(n_way, k_shot, q_query)
        check_int("image_size", image_size, 1, fix="set task.image_size, e.g. 84")
        if channels not in (1, 3):
            raise ConfigError(f"channels={channels!r}; use 3 (RGB) or 1 (grey)")
        if format not in ("auto", "pickle", "csv"):
            raise ConfigError(f"format={format!r} is unknown; use auto, pickle or csv")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"miniImageNet folder {self.root} does not exist; " + _DOWNLOAD_HINT.format(root=self.root))
        self.format = detect_format(self.root) if format == "auto" else format
        for split in SPLITS:  # every split's file must be there before training starts
            present = (
                _pickle_path(self.root, split) is not None
                if self.format == "pickle"
                else (self.root / f"{split}.csv").is_file()
            )
            if not present:
                raise DataError(
                    f"miniImageNet in {self.root} lacks its {split} split ({self.format} format); "
                    + _DOWNLOAD_HINT.format(root=self.root)
                )
        if self.format == "csv":  # the class lists are cheap to read: check every split now
            self._check_csv_splits()
        self.image_size, self.channels, self.cache = image_size, channels, cache
        self.input_shape = (channels, image_size, image_size)
        self.mean = None if mean is None else np.asarray(list(mean), dtype=np.float32)
        self.std = None if std is None else np.asarray(list(std), dtype=np.float32)
        #: uint8 images -> float32, exactly as the sampler's tasks see them
        self.pixels = PixelNorm.from_settings(channels, False, mean, std)
        self._splits: dict[str, _Split] = {}

    def _check_csv_splits(self) -> None:
        """Each split file's classes against ``n_way`` and their images against ``k_shot + q_query``.

        Raises:
            DataError: a split file that cannot be read, a class with too few images, or a
                split with fewer than ``n_way`` classes.
        """
        need, sizes = self.k_shot + self.q_query, {}
        for split in SPLITS:
            _, labels = read_split_csv(self.root / f"{split}.csv")
            names, counts = np.unique(labels, return_counts=True)
            small = [(str(n), int(c)) for n, c in zip(names, counts) if c < need]
            if small:
                raise DataError(
                    f"miniImageNet {split} split: class(es) {small[:5]} have fewer than k_shot + "
                    f"q_query = {need} images; lower k_shot / q_query"
                )
            sizes[split] = len(names)
        check_split_sizes(sizes, self.n_way, f"miniImageNet in {self.root}: ",
                          "lower n_way, or list more classes in that split's CSV file")

    def split_data(self, split: Split) -> _Split:
        """Decode (once) and return one split."""
        split = check_split(split)
        if split not in self._splits:
            if self.format == "pickle":
                data = _load_pickle_split(_pickle_path(self.root, split), self.image_size, self.channels)
            else:
                data = _load_csv_split(self.root, split, self.image_size, self.channels, self.cache)
            need = self.k_shot + self.q_query
            small = [(n, len(r)) for n, r in zip(data.names, data.rows) if len(r) < need]
            if small:
                raise DataError(
                    f"miniImageNet {split} split: class(es) {small[:5]} have fewer than k_shot + "
                    f"q_query = {need} images; lower k_shot / q_query"
                )
            if len(data.names) < self.n_way:
                raise DataError(
                    f"miniImageNet {split} split has {len(data.names)} classes, fewer than "
                    f"n_way={self.n_way}; lower n_way, or add classes to that split's file"
                )
            log.info("miniImageNet %s: %d classes, %d images", split, len(data.names), len(data.images))
            self._splits[split] = data
        return self._splits[split]

    def class_names(self, split: Split) -> list[str]:
        """The class labels (WordNet ids) of a split, indexed by ``Task.classes``."""
        return self.split_data(split).names

    def pool(self, split: Split) -> RaggedPool:
        """The classes of ``split``, decoded on first use; ``Task.classes`` index :meth:`class_names`."""
        data = self.split_data(split)
        return RaggedPool(data.images, np.arange(len(data.names)), data.rows)

    def __repr__(self) -> str:
        return f"MiniImageNetTasks({str(self.root)!r}, {self.format}, {self.n_way}-way {self.k_shot}-shot)"


# --------------------------------------------------------------------------------- download
def download(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically, checking its sha256 if given.

    The file is streamed into a temporary file next to ``dest`` and moved into place only
    when complete and verified; an interrupted or corrupt download leaves nothing behind.

    Raises:
        DataError: the URL cannot be fetched or the checksum differs.
    """
    dest = Path(dest).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot download {url} ({type(exc).__name__}: {exc}); check the URL "
                            "and your connection, or download it yourself into "
                            f"{dest}") from exc
        if sha256 is not None and digest.hexdigest() != sha256.lower():
            raise DataError(
                f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; the download is "
                "corrupt or the file changed: retry, or pass the new checksum if you trust it"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("downloaded %s -> %s (sha256 %s)", url, dest, digest.hexdigest())
    return dest


def download_miniimagenet(
    root: str | os.PathLike,
    urls: Mapping[str, str] | None = None,
    sha256: Mapping[str, str] | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Download the pickled miniImageNet splits into ``root`` (skipping those present).

    Args:
        root: destination folder.
        urls: ``{split: url}``; default :data:`DEFAULT_URLS`.
        sha256: optional ``{split: hex digest}`` to verify.
        force: download even if the file exists.

    Returns:
        ``{split: path}`` of the three files.
    """
    root = Path(root).expanduser()
    urls = dict(urls or DEFAULT_URLS)
    out = {}
    for split in SPLITS:
        dest = root / f"mini-imagenet-cache-{split}.pkl"
        existing = _pickle_path(root, split)
        if existing is not None and not force:
            out[split] = existing
            continue
        out[split] = download(urls[split], dest, (sha256 or {}).get(split))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metanas.tasks.miniimagenet --root DIR``: download the pickled splits."""
    parser = argparse.ArgumentParser(description="Download miniImageNet (pickled arrays).")
    parser.add_argument("--root", default=os.path.join(os.environ.get("METANAS_DATA", "~/data"), "miniimagenet"))
    for split in SPLITS:
        parser.add_argument(f"--{split}-url", default=DEFAULT_URLS[split])
        parser.add_argument(f"--{split}-sha256", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        paths = download_miniimagenet(
            args.root,
            {s: getattr(args, f"{s}_url") for s in SPLITS},
            {s: getattr(args, f"{s}_sha256") for s in SPLITS if getattr(args, f"{s}_sha256")},
            args.force,
        )
    except DataError as exc:
        print(f"metanas miniimagenet download: error: {exc}", file=sys.stderr)
        return 2
    for split, p in paths.items():
        print(f"{split}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

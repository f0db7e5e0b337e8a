"""Few-shot tasks from a folder of images with one sub-folder per class.

Layout (the ``torchvision.datasets.ImageFolder`` convention)::

    root/
      class_a/  img001.png  img002.jpg ...
      class_b/  ...

Every image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP, PNM) of any size and mode is
converted to ``channels`` channels (1: ``L``, 3: ``RGB``; palette images through RGBA, alpha
composited onto black, 16-bit and float images rescaled to 8 bits), resized to
``image_size x image_size`` (aspect ratio not kept, bilinear with antialiasing) and stored as
uint8. At sampling time pixels become float32 in [0, 1] (``x / 255``), optionally inverted
(``1 - x``, e.g. dark ink on white paper -> ink-high like Omniglot) and normalised per channel
with ``mean`` / ``std``.

The decoded arrays are cached as ``.npz`` keyed by a hash of the file list, file sizes,
modification times and the decoding settings, so a second run loads in milliseconds and any
change to the folder invalidates the cache (:func:`metanas.tasks.core.load_cached`: written
atomically, rebuilt when unreadable or of the wrong shape or dtype). Writing a new cache
removes the older ones of the same folder and settings.

Classes are split into meta-train / meta-val / meta-test either by fractions of a seeded
permutation of the sorted class names or by explicit lists of class names.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metanas.errors import ConfigError, DataError

from .core import (
    PixelNorm, PoolSampler, RaggedPool, check_counts, check_int, check_split_sizes, load_cached, split_classes,
)
from .core import pixel_normalisation  # re-exported: metanas.adapt_cli imports it from here

__all__ = [
    "IMAGE_SUFFIXES", "ImageFolderData", "ImageFolderTasks", "image_array", "is_image_file",
    "list_class_folders", "load_image", "load_image_folder", "load_images", "pixel_normalisation",
    "split_classes",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm"}
)
_CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class ImageFolderData:
    """Decoded images of a class-folder dataset.

    Attributes:
        images: uint8 ``(n_images, C, S, S)``.
        labels: int64 ``(n_images,)``, index into ``class_names``.
        class_names: sorted class folder names.
        files: path of each image relative to the root.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[str, ...]

    def rows_of(self) -> list[np.ndarray]:
        """Rows of ``images`` of each class, ``[class index] -> int64 array``."""
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(len(self.class_names) + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(len(self.class_names))]

    def counts(self) -> np.ndarray:
        """Images per class, ``(n_classes,)``."""
        return np.bincount(self.labels, minlength=len(self.class_names))


def is_image_file(path: Path) -> bool:
    """A visible file with an image suffix (:data:`IMAGE_SUFFIXES`)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _check_folder(root: Path, what: str) -> None:
    if not root.exists():
        raise DataError(f"{what} {root} does not exist; pass the path of an existing folder")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a folder; pass a folder of images")


def list_class_folders(root: str | os.PathLike, what: str = "image folder") -> list[tuple[str, list[Path]]]:
    """The class sub-folders of ``root`` and their image files, both sorted.

    Raises:
        DataError: ``root`` is missing, not a folder, has no class sub-folders, or a class
            folder holds no image file.
    """
    root = Path(root).expanduser()
    _check_folder(root, what)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if is_image_file(p)]
        hint = (f" (it holds {len(loose)} loose images: put each class's images in a sub-folder "
                "named after the class)") if loose else ""
        raise DataError(
            f"{what} {root} has no class sub-folders{hint}; expected root/<class name>/<images>"
        )
    out = []
    empty = []
    for c in classes:
        files = sorted(p for p in c.iterdir() if is_image_file(p))
        if not files:
            empty.append(c.name)
        out.append((c.name, files))
    if empty:
        raise DataError(
            f"{what} {root}: class folder(s) {empty[:10]} hold no image "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder(s)"
        )
    return out


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float images -> 8-bit ``L`` (rescaled by the type's range)."""
    arr = np.asarray(im)
    if im.mode == "F":
        top = float(arr.max()) if arr.size and arr.max() > 1.0 else 1.0
        arr = np.clip(arr / top * 255.0, 0, 255)
    else:
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr.astype(np.float64) / top * 255.0, 0, 255)
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L")


def _convert(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("L" if channels == 1 else "RGB")


def image_array(im: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """A Pillow image of any mode as uint8 ``(channels, image_size, image_size)``, converted and
    resized as the module docstring says."""
    im = _convert(im, channels).resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_image(path: str | os.PathLike, image_size: int, channels: int) -> np.ndarray:
    """Read one image as uint8 ``(channels, image_size, image_size)``.

    Raises:
        DataError: the file is unreadable, truncated, not an image, or too large for Pillow.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decodes now: a truncated file raises here
            return image_array(im, image_size, channels)
    except Image.DecompressionBombError as exc:  # e.g. "Image size (N pixels) exceeds limit of M pixels"
        sizes = re.search(r"\((\d+) pixels\) exceeds limit of (\d+) pixels", str(exc))
        size = (f": {int(sizes[1]):,} pixels ({int(sizes[1]) / 1e6:.0f} megapixels), over Pillow's limit of "
                f"{int(sizes[2]):,} pixels") if sizes else f" ({exc})"
        raise DataError(
            f"image {path} is too large{size} (a guard against decompression bombs); downscale "
            "it or remove it"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"image {path} cannot be read ({type(exc).__name__}: {exc}); it is truncated, "
            "corrupt or not an image: replace or delete it"
        ) from exc


def load_images(
    items: Sequence[Any], image_size: int, channels: int, read: Callable[[Any, int, int], np.ndarray] = load_image
) -> np.ndarray:
    """``read(item, image_size, channels)`` of each item (default: image files) as uint8
    ``(len(items), channels, image_size, image_size)``."""
    out = np.empty((len(items), channels, image_size, image_size), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = read(item, image_size, channels)
    return out


def _check_settings(image_size: int, channels: int) -> None:
    check_int("image_size", image_size, 1, fix="set task.image_size to a positive integer, e.g. 28 or 84")
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels!r}; use 1 (grey) or 3 (RGB)")


def _default_cache_dir(root: Path) -> Path:
    local = root / ".metanas_cache"
    if os.access(root, os.W_OK):
        return local
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "metanas" / "image_folders"


def load_image_folder(
    root: str | os.PathLike, image_size: int = 28, channels: int = 1, cache: bool = True,
    cache_dir: str | os.PathLike | None = None, what: str = "image folder",
) -> ImageFolderData:
    """Decode a class-folder dataset, using (and filling) the array cache.

    Args:
        root: folder with one sub-folder of images per class.
        image_size: side S of the square output images.
        channels: 1 (grey) or 3 (RGB).
        cache: read and write the ``.npz`` cache.
        cache_dir: where the cache goes; default ``root/.metanas_cache`` if ``root`` is
            writable, else ``$XDG_CACHE_HOME/metanas/image_folders``.
        what: how error messages name the folder.

    Returns:
        The :class:`ImageFolderData`.

    Raises:
        DataError: see :func:`list_class_folders` and :func:`load_image`.
    """
    _check_settings(image_size, channels)
    root = Path(root).expanduser().resolve() if Path(root).expanduser().exists() else Path(root)
    classes = list_class_folders(root, what)
    entries = []
    for name, files in classes:
        for f in files:
            st = f.stat()
            entries.append((f.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    files = tuple(e[0] for e in entries)
    labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, (_, fs) in enumerate(classes)])
    key = [_CACHE_VERSION, image_size, channels, entries]
    layout = {"images": (np.dtype(np.uint8), (len(files), channels, image_size, image_size)),
              "labels": (np.dtype(np.int64), (len(files),))}  # labels: derived, kept for the v1 format
    folder = (cache_dir or _default_cache_dir(root)) if cache else None
    scope = [_CACHE_VERSION, str(root), image_size, channels]  # this folder at these settings
    arrays = load_cached(folder, "images", key, layout, lambda: {
        "images": load_images([root / f for f in files], image_size, channels), "labels": labels}, scope)
    return ImageFolderData(arrays["images"], labels, tuple(n for n, _ in classes), files)


class ImageFolderTasks(PoolSampler):
    """N-way K-shot tasks from a folder of class sub-folders (see the module docstring).

    Tasks are float32, ``support_x`` ``(n_way * k_shot, C, S, S)`` and ``query_x``
    ``(n_way * q_query, C, S, S)``, normalised by :attr:`pixels`.

    Args:
        root: the dataset folder.
        n_way, k_shot, q_query: the episodes' shape.
        image_size: side of the square images.
        channels: 1 (grey) or 3 (RGB).
        split_fractions: (train, val, test) shares of the classes, by a seeded permutation;
            ``[0, 0, 1]`` puts every class in the test split (a dataset only adapted to).
        split_seed: seed of that permutation.
        classes: explicit ``{split: [class names]}`` instead of fractions.
        invert: use ``1 - x`` (dark ink on light paper -> ink-high).
        mean, std: per-channel normalisation after scaling to [0, 1] (length ``channels``).
        cache, cache_dir: see :func:`load_image_folder`.

    Raises:
        DataError: missing or empty folder, unreadable image, a class with fewer than
            ``k_shot + q_query`` images (all offenders named), or a split with some but fewer
            than ``n_way`` classes (:func:`~metanas.tasks.core.check_split_sizes`).
        ConfigError: bad settings.
    """

    def __init__(
        self, root: str | os.PathLike, n_way: int = 5, k_shot: int = 1, q_query: int = 15,
        image_size: int = 28, channels: int = 1, split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
        split_seed: int = 0, classes: Mapping[str, Sequence[str]] | None = None, invert: bool = False,
        mean: Sequence[float] | None = None, std: Sequence[float] | None = None, cache: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if root in (None, "", "???"):
            raise DataError("no image folder given; set task.root=<folder of class sub-folders>")
        self.n_way, self.k_shot, self.q_query = check_counts(n_way, k_shot, q_query)
        self.root = Path(root).expanduser()
        self.where = f"image folder {self.root}: "
        self.data = load_image_folder(self.root, image_size, channels, cache, cache_dir)
        self.input_shape = (channels, image_size, image_size)
        self.class_names = self.data.class_names
        self.invert = bool(invert)
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        #: uint8 images -> float32, exactly as the sampler's tasks see them
        self.pixels = PixelNorm.from_settings(channels, self.invert, self.mean, self.std)
        self.splits = split_classes(self.class_names, split_fractions, split_seed, classes)
        rows = self.data.rows_of()
        self.pools = {s: RaggedPool(self.data.images, i, [rows[c] for c in i]) for s, i in self.splits.items()}
        need = self.k_shot + self.q_query
        small = [(n, len(r)) for n, r in zip(self.class_names, rows) if len(r) < need]
        if small:
            listed = ", ".join(f"{n!r} ({c})" for n, c in small[:8])
            raise DataError(
                f"image folder {self.root}: {len(small)} class(es) have fewer images than "
                f"k_shot + q_query = {need}: {listed}{' ...' if len(small) > 8 else ''}; add "
                "images, lower k_shot / q_query, or remove those class folders"
            )
        fix = (
            f"lower n_way or name at least {self.n_way} classes in each split of `classes`" if classes is not None
            else f"lower n_way, add classes or change split_fractions (now {[float(f) for f in split_fractions]}; "
            "[0, 0, 1] for a dataset only adapted to)"
        )
        check_split_sizes({sp: len(v) for sp, v in self.splits.items()}, self.n_way, f"image folder {self.root}: ", fix)

    def __repr__(self) -> str:
        sizes = {s: len(v) for s, v in self.splits.items()}
        return (
            f"ImageFolderTasks({str(self.root)!r}, {self.n_way}-way {self.k_shot}-shot, "
            f"{len(self.class_names)} classes {sizes}, input {self.input_shape})"
        )

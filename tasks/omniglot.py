"""Omniglot few-shot tasks from the embedded, offline ``omniglot.npz``.

Omniglot (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 350(6266), 2015; MIT licence, see
``data/omniglot/README.md``) has 1623 handwritten characters from 50 alphabets, 20 drawings
each. Two meta-learning protocols are supported:

* ``split="standard"`` (Lake et al. 2015): the 964 characters of the 30 *background*
  alphabets are meta-train, except ``n_val_classes`` of them (a permutation seeded with
  ``split_seed``) held out for meta-validation; the 659 characters of the 20 *evaluation*
  alphabets are meta-test. No rotations by default.
* ``split="vinyals"`` (Vinyals et al., Matching Networks, NeurIPS 2016; Finn et al., MAML,
  ICML 2017; Santoro et al. 2016): all 1623 characters are permuted with ``split_seed``; the
  first 1200 are meta-train, of which the *last* ``n_val_classes`` are meta-validation, and the
  remaining 423 are meta-test. Every (character, rotation) pair is its own class, rotations
  (0, 90, 180, 270) by default, so with ``n_val_classes=100`` the splits have 4400 / 400 / 1692
  classes. Splitting is by character, so rotated copies of one character never cross splits.

Global class ids (``Task.classes``) are ``character + 1623 * (rotation // 90)``: the row of the
character in the data file (0..963 background, 964..1622 evaluation) for unrotated classes.

Pixels are float32 in [0, 1] with ink = 1 and paper = 0 (the file stores the original PNG
convention, 255 = paper; it is inverted once at load time), shape ``(1, S, S)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
from PIL import Image

from metanas.errors import ConfigError, DataError

from .base import SPLITS, Split, check_split
from .core import (
    UNIT_PIXELS, DensePool, Layout, PoolSampler, Rotations, check_counts, check_int, permuted_split, read_npz,
)

__all__ = ["DIGESTS", "OmniglotData", "OmniglotTasks", "load_omniglot", "resize_packed"]

log = logging.getLogger(__name__)

N_CHARACTERS = 1623
N_DRAWINGS = 20
N_BACKGROUND = 964
N_EVALUATION = 659
FULL_SIZE = 105
VINYALS_TRAIN_CHARACTERS = 1200

#: sha256 of the raw C-order bytes of the image arrays (data/omniglot/README.md).
DIGESTS = {
    "images_packed": "449a842a386424cad053204db411f835789ed4dfc6f53b1cc472266df95505d9",
    "images_28": "064c72a352f9e549c13af971be4d08e06ad22a438a17d630f7131a03ee0665c2",
}

_EXPECTED: Layout = {
    "images_packed": (np.dtype(np.uint8), (N_CHARACTERS, N_DRAWINGS, 1379)),
    "images_28": (np.dtype(np.uint8), (N_CHARACTERS, N_DRAWINGS, 28, 28)),
    "char_alphabet": (np.dtype(np.int16), (N_CHARACTERS,)),
    "char_number": (np.dtype(np.int16), (N_CHARACTERS,)),
    "char_file_id": (np.dtype(np.int16), (N_CHARACTERS,)),
    "char_split": (np.dtype(np.int8), (N_CHARACTERS,)),
    "alphabet_names": ("U", (50,)),
    "alphabet_split": (np.dtype(np.int8), (50,)),
    "alphabet_small1": (np.dtype(np.bool_), (50,)),
    "alphabet_small2": (np.dtype(np.bool_), (50,)),
    "split_names": ("U", (2,)),
    "image_shape": (np.dtype(np.int16), (2,)),
}
_METADATA = ("char_alphabet", "char_number", "char_split", "alphabet_names")
_FIX = (
    "re-install metanas (its wheel ships metanas/tasks/data/omniglot/omniglot.npz) "
    "or pass task.path=<a copy of omniglot.npz>"
)


@dataclass(frozen=True, eq=False)
class OmniglotData:
    """The arrays a sampler needs, ink-high.

    Attributes:
        images: uint8 ``(1623, 20, S, S)``, 255 = ink, 0 = paper.
        char_alphabet: int16 ``(1623,)``, index into ``alphabet_names``.
        char_number: int16 ``(1623,)``, 1-based character number within its alphabet.
        char_split: int8 ``(1623,)``, 0 = background, 1 = evaluation.
        alphabet_names: str ``(50,)``.
    """

    images: np.ndarray
    char_alphabet: np.ndarray
    char_number: np.ndarray
    char_split: np.ndarray
    alphabet_names: np.ndarray


def _packaged_file() -> Traversable:
    """The ``omniglot.npz`` shipped inside the package (checkout or installed wheel)."""
    return resources.files("metanas.tasks") / "data" / "omniglot" / "omniglot.npz"


def resize_packed(packed: np.ndarray, size: int, chunk: int = 1000) -> np.ndarray:
    """Unpack 105x105 bit-packed images and resize them with Pillow LANCZOS.

    The result is bit-identical to ``Image.fromarray(img).resize((size, size), LANCZOS)`` on
    each 8-bit (0/255) image (the recipe that built ``images_28``), but about twice as fast:
    Pillow resamples in two separable passes (horizontal, then vertical, with an 8-bit
    intermediate), so one horizontal-only resize of a tall strip of images followed by one
    vertical-only resize of a wide strip gives the same pixels with far fewer calls. Cost on
    one CPU core: about 2.6 s for all 32,460 images at size 28-32, 6 s at 84.

    Args:
        packed: uint8 ``(..., 1379)``, each row a 105x105 image packed with ``np.packbits``.
        size: output side length S.
        chunk: images per Pillow call (bounds peak memory to ~``chunk * 11`` KB).

    Returns:
        uint8 ``(..., S, S)`` in the stored convention (255 = paper).
    """
    lead = packed.shape[:-1]
    flat = packed.reshape(-1, packed.shape[-1])
    out = np.empty((flat.shape[0], size, size), dtype=np.uint8)
    lanczos = Image.Resampling.LANCZOS
    for start in range(0, flat.shape[0], chunk):
        bits = np.unpackbits(flat[start : start + chunk], axis=-1, count=FULL_SIZE * FULL_SIZE)
        n = bits.shape[0]
        bits *= 255
        tall = Image.fromarray(bits.reshape(n * FULL_SIZE, FULL_SIZE))
        narrow = np.asarray(tall.resize((size, n * FULL_SIZE), lanczos))  # (n*105, S)
        wide = np.ascontiguousarray(
            narrow.reshape(n, FULL_SIZE, size).transpose(1, 0, 2).reshape(FULL_SIZE, n * size)
        )
        small = np.asarray(Image.fromarray(wide).resize((n * size, size), lanczos))  # (S, n*S)
        out[start : start + n] = small.reshape(size, n, size).transpose(1, 0, 2)
    return out.reshape(*lead, size, size)


def load_omniglot(
    path: str | os.PathLike[str] | None = None, image_size: int = 28, verify: bool = True
) -> OmniglotData:
    """Load ``omniglot.npz`` and return ink-high uint8 images of side ``image_size``.

    ``image_size=28`` uses the stored ``images_28``; any other size is resized from the
    105x105 originals with :func:`resize_packed` (seconds, see there). Array keys, shapes and
    dtypes are always checked (from the npy headers, without decompressing); with ``verify``
    the sha256 of the image array that is used is compared with :data:`DIGESTS` as well
    (about 30 ms for ``images_28``, 60 ms for ``images_packed``).

    Args:
        path: the npz file; ``None`` for the copy shipped with the package.
        image_size: output side length S.
        verify: check the content digest of the image array used.

    Returns:
        :class:`OmniglotData` with ``images`` of shape ``(1623, 20, S, S)``, 255 = ink.

    Raises:
        DataError: if the file is missing, unreadable, truncated, of the wrong layout, or its
            content digest does not match.
    """
    if path is None:
        with resources.as_file(_packaged_file()) as local:
            return _load_file(Path(local), image_size, verify)
    return _load_file(Path(os.path.expanduser(os.fspath(path))), image_size, verify)


def _load_file(path: Path, image_size: int, verify: bool) -> OmniglotData:
    if not path.is_file():
        raise DataError(f"Omniglot data file {path} does not exist; {_FIX}")
    key = "images_28" if image_size == 28 else "images_packed"
    t0 = time.perf_counter()
    arrays = read_npz(path, _EXPECTED, (key, *_METADATA), fix=_FIX)
    raw, meta = arrays.pop(key), arrays
    t_load = time.perf_counter() - t0
    if verify:
        digest = hashlib.sha256(np.ascontiguousarray(raw).data).hexdigest()
        if digest != DIGESTS[key]:
            raise DataError(
                f"{path}: sha256 of {key!r} is {digest}, expected {DIGESTS[key]}; the file is "
                f"corrupt or modified; {_FIX} (or pass task.verify=false to use a modified "
                "copy on purpose)"
            )
    counts = tuple(int(np.count_nonzero(meta["char_split"] == s)) for s in (0, 1))
    if counts != (N_BACKGROUND, N_EVALUATION):
        raise DataError(
            f"{path}: char_split has {counts} background/evaluation characters, "
            f"expected ({N_BACKGROUND}, {N_EVALUATION}); {_FIX}"
        )
    t1 = time.perf_counter()
    images = raw if key == "images_28" else resize_packed(raw, image_size)
    np.subtract(255, images, out=images)  # ink = 255
    log.info(
        "loaded %s (%s) in %.2f s, verify=%s %.3f s, %dx%d images in %.2f s",
        path, key, t_load, verify, t1 - t0 - t_load, image_size, image_size,
        time.perf_counter() - t1,
    )
    return OmniglotData(images=images, **meta)


class OmniglotTasks(PoolSampler):
    """N-way K-shot Q-query Omniglot tasks (implements :class:`~metanas.tasks.TaskSampler`).

    The npz is read once per instance; images stay uint8 ``(1623, 20, S, S)`` in memory
    (25 MB at S=28) and only the drawn examples are rotated and converted to float per task
    (about 0.1 ms for 5-way 1-shot 15-query at S=28, 0.2 ms with rotations, on one CPU core):
    ``support_x`` ``(n_way*k_shot, 1, S, S)`` and ``query_x`` ``(n_way*q_query, 1, S, S)``,
    float32, ink = 1.
    Construction costs about 0.2 s at ``image_size=28`` (of which the sha256 check is ~20 ms)
    and about 2.6 s at 32 (6 s at 84; up to twice that on a busy machine): any size but 28
    resizes all 32,460 105x105 originals once, since both protocols use every character.

    Args:
        n_way: classes per task, >= 2 and at most the classes of the smallest split.
        k_shot: support drawings per class, >= 1.
        q_query: query drawings per class, >= 1; ``k_shot + q_query <= 20``.
        image_size: side S of the ``(1, S, S)`` inputs, 8..105; 28 uses the stored
            28x28 copy, any other size is resized from the originals at construction.
        split: ``"standard"`` (background / evaluation alphabets) or ``"vinyals"``
            (1200 / 423 random characters); see the module docstring.
        n_val_classes: *characters* held out of the meta-train pool for meta-validation
            (each one is ``len(rotations)`` classes); 1 .. pool-1 (pool: 964 standard,
            1200 vinyals).
        split_seed: seed of the permutation that picks validation (and, for vinyals, test)
            characters; independent of the task-sampling rng.
        rotations: angles (degrees, counter-clockwise) from (0, 90, 180, 270); each
            (character, angle) is its own class. ``None``: ``(0,)`` for ``"standard"``,
            all four for ``"vinyals"``.
        path: the npz file; ``None`` for the copy shipped with the package.
        verify: check the sha256 content digest of the images used (about 30-60 ms).

    Raises:
        ConfigError: for any out-of-range argument (the message names the fix).
        DataError: for a missing, truncated or corrupt data file.
    """

    def __init__(
        self, n_way: int = 5, k_shot: int = 1, q_query: int = 15, image_size: int = 28,
        split: str = "standard", n_val_classes: int = 100, split_seed: int = 0,
        rotations: Iterable[int] | None = None, path: str | os.PathLike[str] | None = None,
        verify: bool = True,
    ) -> None:
        if split not in ("standard", "vinyals"):
            raise ConfigError(
                f"task.split={split!r} is not an Omniglot protocol; use 'standard' "
                "(background/evaluation alphabets) or 'vinyals' (1200/423 characters, rotations)"
            )
        self.n_way, self.k_shot, self.q_query = check_counts(n_way, k_shot, q_query)
        self.image_size = check_int("image_size", image_size, fix="set task.image_size, e.g. 28")
        n_val = check_int("n_val_classes", n_val_classes, fix="set task.n_val_classes, e.g. 100")
        self.split_seed = check_int("split_seed", split_seed, fix="set task.split_seed, e.g. 0")
        self.split = split
        if rotations is None:
            rotations = Rotations.ALL if split == "vinyals" else (0,)
        self._rotate = Rotations.parse(rotations, N_CHARACTERS)
        self.rotations = self._rotate.angles
        self.n_val_classes = n_val

        if self.k_shot + self.q_query > N_DRAWINGS:
            raise ConfigError(
                f"k_shot + q_query = {self.k_shot} + {self.q_query} = "
                f"{self.k_shot + self.q_query} but Omniglot has only {N_DRAWINGS} drawings per "
                "class; lower task.k_shot or task.q_query"
            )
        if not 8 <= self.image_size <= FULL_SIZE:
            raise ConfigError(
                f"image_size={self.image_size} is out of range; use 8..{FULL_SIZE} "
                f"(the originals are {FULL_SIZE}x{FULL_SIZE}; upsample in the model if needed)"
            )
        pool = N_BACKGROUND if split == "standard" else VINYALS_TRAIN_CHARACTERS
        if not 1 <= n_val < pool:
            raise ConfigError(
                f"n_val_classes={n_val} is out of range for split={split!r}: it counts "
                f"characters held out of the {pool} meta-train characters, so use 1..{pool - 1}"
            )
        n_test_chars = N_EVALUATION if split == "standard" else N_CHARACTERS - pool
        sizes = {
            "train": (pool - n_val) * len(self.rotations),
            "val": n_val * len(self.rotations),
            "test": n_test_chars * len(self.rotations),
        }
        for name, size in sizes.items():
            if self.n_way > size:
                raise ConfigError(
                    f"n_way={self.n_way} but the {name!r} split has only {size} classes; lower "
                    "task.n_way"
                    + (" or raise task.n_val_classes" if name == "val" else
                       " or lower task.n_val_classes" if name == "train" else "")
                )
        self.input_shape: tuple[int, int, int] = (1, self.image_size, self.image_size)

        data = load_omniglot(path, self.image_size, verify)
        self._images = data.images
        self._alphabet_names = data.alphabet_names
        self._char_alphabet = data.char_alphabet
        self._char_number = data.char_number
        chars = self._split_characters(data.char_split)
        self.pools = {s: DensePool(self._images, *self._rotate.expand(chars[s], chars[s])) for s in SPLITS}
        self.transforms, self.pixels = ((self._rotate,) if self.rotations != (0,) else ()), UNIT_PIXELS
        log.info(
            "Omniglot %s split: %d/%d/%d train/val/test classes, rotations %s, %dx%d",
            split, *sizes.values(), self.rotations, self.image_size, self.image_size,
        )

    def _split_characters(self, char_split: np.ndarray) -> dict[str, np.ndarray]:
        """Sorted characters of each split (see the module docstring)."""
        n_val, seed = self.n_val_classes, self.split_seed
        if self.split == "standard":
            sizes = {"val": n_val, "train": N_BACKGROUND - n_val}
            chars = permuted_split(np.flatnonzero(char_split == 0), sizes, seed)
            return {**chars, "test": np.flatnonzero(char_split == 1)}
        cut = VINYALS_TRAIN_CHARACTERS
        sizes = {"train": cut - n_val, "val": n_val, "test": N_CHARACTERS - cut}
        return permuted_split(np.arange(N_CHARACTERS), sizes, seed)

    def n_classes(self, split: Split) -> int:
        """Number of classes ((character, rotation) pairs) in ``split``."""
        return len(self.pools[check_split(split)].ids)

    def class_ids(self, split: Split) -> np.ndarray:
        """Global class ids of ``split``, int64 ``(n_classes,)``: char + 1623 * (angle // 90)."""
        return self.pools[check_split(split)].ids.copy()

    def class_name(self, class_id: int) -> str:
        """Human-readable name of a global class id, e.g. ``'Hebrew/character05@90'``."""
        char, turns = int(class_id) % N_CHARACTERS, int(class_id) // N_CHARACTERS
        name = self._alphabet_names[self._char_alphabet[char]]
        angle = f"@{90 * turns}" if turns else ""
        return f"{name}/character{int(self._char_number[char]):02d}{angle}"

    def __repr__(self) -> str:
        return (
            f"OmniglotTasks(n_way={self.n_way}, k_shot={self.k_shot}, q_query={self.q_query}, "
            f"image_size={self.image_size}, split={self.split!r}, "
            f"n_val_classes={self.n_val_classes}, split_seed={self.split_seed}, "
            f"rotations={self.rotations})"
        )

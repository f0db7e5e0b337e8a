"""A small synthetic image-folder dataset of drawn shapes, for transfer experiments and tests.

:func:`make_shapes_folder` draws ``n_classes`` classes of geometric shapes with Pillow: the
class is a (shape, style) pair, e.g. a filled hexagon or an outlined star; every image varies
the position, size, rotation (within +-20 degrees), stroke width, colours and noise. Images
are written as PNG or JPEG of several sizes and modes (grey, RGB, palette, RGBA), so a
dataset made by it also exercises the image-folder loader's conversions. Everything is drawn
from one seeded ``numpy.random.Generator``: the same arguments give the same files.

Shapes are light on a dark background (ink-high, like Omniglot's pixels in metanas).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "STYLES", "make_shapes_folder", "shape_class_names"]

#: shape name -> polygon vertex count (0: ellipse-like, drawn specially)
SHAPES: dict[str, int] = {
    "circle": 0,
    "triangle": 3,
    "square": 4,
    "pentagon": 5,
    "hexagon": 6,
    "star": -5,
    "cross": -1,
    "ring": -2,
    "arrow": -3,
    "crescent": -4,
}
STYLES = ("filled", "outline")


def shape_class_names(n_classes: int) -> list[str]:
    """The first ``n_classes`` of the ``len(SHAPES) * len(STYLES)`` class names."""
    names = [f"{s}_{style}" for style in STYLES for s in SHAPES]
    if not 1 <= n_classes <= len(names):
        raise ValueError(f"n_classes={n_classes} must be in [1, {len(names)}]")
    return names[:n_classes]


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * i / n - math.pi / 2),
         cy + r * math.sin(rot + 2 * math.pi * i / n - math.pi / 2))
        for i in range(n)
    ]


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rr = r if i % 2 == 0 else 0.42 * r
        a = rot + math.pi * i / 5 - math.pi / 2
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotate(pts: list[tuple[float, float]], cx: float, cy: float, rot: float) -> list[tuple[float, float]]:
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, filled: bool, cx: float, cy: float, r: float,
    rot: float, width: int, ink: int,
) -> None:
    fill = ink if filled else None
    kind = SHAPES[shape]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=ink, width=width)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=ink, width=max(width, int(r / 3)))
        if filled:
            draw.ellipse([cx - r / 4, cy - r / 4, cx + r / 4, cy + r / 4], fill=ink)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r, rot), fill=fill, outline=ink, width=width)
    elif shape == "cross":
        t = r / 3
        pts = [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
               (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
               (cx - r, cy - t), (cx - t, cy - t)]
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fill, outline=ink, width=width)
    elif shape == "arrow":
        t = r / 3
        pts = [(cx - r, cy - t), (cx, cy - t), (cx, cy - r), (cx + r, cy), (cx, cy + r), (cx, cy + t),
               (cx - r, cy + t)]
        draw.polygon(_rotate(pts, cx, cy, rot), fill=fill, outline=ink, width=width)
    elif shape == "crescent":
        draw.pieslice([cx - r, cy - r, cx + r, cy + r], 90 + math.degrees(rot), 270 + math.degrees(rot),
                      fill=fill, outline=ink, width=width)
    else:
        draw.polygon(_polygon(cx, cy, r, kind, rot), fill=fill, outline=ink, width=width)


def make_shapes_folder(
    root: str | os.PathLike,
    n_classes: int = 20,
    n_images: int = 20,
    seed: int = 0,
    sizes: tuple[int, ...] = (28, 32, 48, 64),
    mixed_formats: bool = True,
) -> list[str]:
    """Write a class-folder dataset of drawn shapes under ``root``.

    Args:
        root: output folder (created); ``root/<class>/<i>.png|jpg``.
        n_classes: number of classes, at most ``len(SHAPES) * len(STYLES)`` (20).
        n_images: images per class.
        seed: seed of every random choice.
        sizes: image side lengths drawn from per image (the loader resizes them).
        mixed_formats: vary file format (PNG / JPEG) and mode (L, RGB, P, RGBA) per image;
            otherwise every image is an 8-bit grey PNG.

    Returns:
        The class names, in folder order.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = shape_class_names(n_classes)
    for name in names:
        shape, style = name.rsplit("_", 1)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            size = int(rng.choice(sizes))
            scale = 4  # draw at 4x and downsample: smooth edges
            big = size * scale
            img = Image.new("L", (big, big), int(rng.integers(0, 40)))
            draw = ImageDraw.Draw(img)
            r = big * rng.uniform(0.25, 0.4)
            cx = big / 2 + rng.uniform(-0.08, 0.08) * big
            cy = big / 2 + rng.uniform(-0.08, 0.08) * big
            rot = math.radians(rng.uniform(-20, 20))
            width = max(1, int(big * rng.uniform(0.03, 0.06)))
            _draw_shape(draw, shape, style == "filled", cx, cy, r, rot, width, int(rng.integers(200, 256)))
            img = img.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (size, size))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
            kind = int(rng.integers(0, 5)) if mixed_formats else 0
            if kind == 0:
                img.save(folder / f"{i:03d}.png")
            elif kind == 1:
                img.convert("RGB").save(folder / f"{i:03d}.jpg", quality=95)
            elif kind == 2:
                img.convert("RGB").save(folder / f"{i:03d}.png")
            elif kind == 3:
                img.convert("P").save(folder / f"{i:03d}.png")
            else:
                rgba = img.convert("RGBA")
                rgba.putalpha(255)
                rgba.save(folder / f"{i:03d}.png")
    return names

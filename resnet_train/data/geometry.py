"""Crop-box geometry in source coordinates, for the loader workers.

Workers pick the crop window in *source* coordinates and resize only that box (see "crop
before resize, exactly" in ``docs/architecture.md``): ``crop_box_*`` choose the window and
``jpeg.load_crop`` decodes and resizes it. This has the distribution of resize-then-crop at
a fraction of the cost, and pure functions of (size, RNG) are easy to test on their own.

A crop is a ``Crop``: the window (x0, y0, x1, y1) in source pixels (fractional), the output
(width, height), the flip, and ``edge``, which says which reference it reproduces:

- ``"image"``: resize-then-crop (torchvision ``Resize`` + ``CenterCrop``/``RandomCrop``).
  Output pixel k lies at x0 + (k + 0.5) * (x1 - x0) / width and the filter's support is
  clipped at the *image* border, so pixels just outside the box count, as they do when the
  whole image is resized first. The box lies on the resized image's pixel grid
  (x0 * width / (x1 - x0) is a whole number), which ``jpeg.load_crop`` relies on.
- ``"box"``: crop-then-resize (torchvision ``RandomResizedCrop``): an integral box, and only
  the pixels inside it count.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple


class Crop(NamedTuple):
    box: tuple[float, float, float, float]
    size: tuple[int, int]
    flip: bool
    edge: str = "image"  # "image": resize then crop; "box": crop then resize


def _resized(w: int, h: int, side: int) -> tuple[int, int]:
    """torchvision Resize(side): the short side becomes ``side``, the long side truncates."""
    if w <= h:
        return side, int(side * h / w)
    return int(side * w / h), side


def _box(w, h, rw, rh, left, top, cw, ch):
    sx, sy = w / rw, h / rh
    return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)


def crop_box_paper(w: int, h: int, scale: tuple[int, int], crop: int, flip: bool,
                   rng: random.Random):
    """He et al. 2015 scale augmentation: short side ~ U{scale}, random crop, flip p=0.5."""
    side = rng.randint(scale[0], scale[1])
    rw, rh = _resized(w, h, side)
    cw, ch = min(crop, rw), min(crop, rh)
    top, left = rng.randint(0, rh - ch), rng.randint(0, rw - cw)
    return Crop(_box(w, h, rw, rh, left, top, cw, ch), (crop, crop),
                flip and rng.random() < 0.5)


def crop_box_rrc(w: int, h: int, scale, ratio, crop: int, flip: bool, rng: random.Random):
    """torchvision's RandomResizedCrop window (area scale, log-uniform aspect ratio), flip."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:  # the central crop of the closest allowed aspect ratio
        in_ratio = w / h
        if in_ratio < min(ratio):
            cw, ch = w, int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            ch, cw = h, int(round(h * max(ratio)))
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    box = (left, top, left + cw, top + ch)
    return Crop(box, (crop, crop), flip and rng.random() < 0.5, "box")


def crop_box_center(w: int, h: int, resize: int, crop: int):
    """Validation: torchvision Resize(resize) + CenterCrop(crop) as one box."""
    rw, rh = _resized(w, h, resize)
    cw, ch = min(crop, rw), min(crop, rh)
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
    return Crop(_box(w, h, rw, rh, left, top, cw, ch), (cw, ch), False)


def crop_box_resized(w: int, h: int, side: int):
    """The whole image with its short side resized to ``side`` (10-crop's input)."""
    rw, rh = _resized(w, h, side)
    return Crop((0.0, 0.0, float(w), float(h)), (rw, rh), False)


def crop_box_full(w: int, h: int, side: int):
    """The whole image with its short side reduced to ``side``; never enlarged here (each
    test scale is then resized on the device from these pixels: one resampling for an
    image at most ``side`` on its short side, the most of ImageNet's val images at 640;
    a larger one is reduced here first, to 8 bits, so its smaller scales are resampled
    twice, for a bounded transfer)."""
    if min(w, h) <= side:
        return Crop((0.0, 0.0, float(w), float(h)), (w, h), False)
    rw, rh = _resized(w, h, side)
    return Crop((0.0, 0.0, float(w), float(h)), (rw, rh), False)

"""Evaluation views: the test-time crops and scales of one loader batch.

Evaluation protocols (``resnet-eval``, ``data.val.protocol``):

- ``center``: short side -> ``val.resize``, centre crop ``val.crop`` (one view).
- ``ten_crop``: short side -> ``val.resize``, then ``ten_crop``: the four corners and the
  centre, then the horizontal flips of those five, in that order (10 views).
- ``multiscale``: the whole image, short side resized to each of ``val.scales`` (paper:
  224, 256, 384, 480, 640) for the fully-convolutional network; optionally with flips.

``eval_views(x, protocol, ...)`` turns one loader batch into a list of view batches of the
same images in the same order; the score of an image is the mean of its views' scores.
These are tensor ops on decoded images, apart from how they were loaded: ``evaluate``
applies them to a batch, and the folder workers use ``ten_crop`` to cut an image's views.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import _resized

# He et al. 2015, section 3.4: fully-convolutional testing at these short sides.
MULTI_SCALES = (224, 256, 384, 480, 640)
EVAL_PROTOCOLS = ("center", "ten_crop", "multiscale")


def _as_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # PIL / HWC array


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """The centre ``crop`` x ``crop`` window of (..., H, W), torchvision's rounding."""
    h, w = x.shape[-2:]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return x[..., top:top + crop, left:left + crop]


def ten_crop(img, crop: int) -> torch.Tensor:
    """The 10 views of the 10-crop test: (..., C, H, W) -> (..., 10, C, crop, crop).

    Order: top-left, top-right, bottom-left, bottom-right, centre, then the horizontal flips
    of those five in the same order (view k + 5 is view k mirrored). Accepts a CHW or NCHW
    tensor, or a PIL image / HWC array (returned as a (10, C, crop, crop) uint8 tensor).
    """
    x = _as_tensor(img)
    h, w = x.shape[-2:]
    if crop > h or crop > w:
        raise ValueError(f"ten_crop: crop {crop} is larger than the image {h}x{w}")
    five = [x[..., :crop, :crop], x[..., :crop, w - crop:], x[..., h - crop:, :crop],
            x[..., h - crop:, w - crop:], center_crop(x, crop)]
    five = torch.stack(five, dim=-4)
    return torch.cat([five, five.flip(-1)], dim=-4)


def resize_short(x: torch.Tensor, side: int) -> torch.Tensor:
    """Resize (N, C, H, W) so that its short side is ``side`` (bilinear, antialiased).

    The long side follows torchvision's Resize (truncated). uint8 in, uint8 out (rounded);
    float in, float out.
    """
    h, w = x.shape[-2:]
    rw, rh = _resized(w, h, side)
    if (rh, rw) == (h, w):
        return x
    y = F.interpolate(x.float(), size=(rh, rw), mode="bilinear", align_corners=False,
                      antialias=True)
    if x.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(x.dtype)


def eval_views(x: torch.Tensor, protocol: str = "center", crop: int = 224,
               scales=MULTI_SCALES, flip: bool = False) -> list[torch.Tensor]:
    """The test-time views of one loader batch: a list of (N, C, h, w) batches of the same N
    images, in the same order. Average the per-view scores (e.g. softmax) over the list.

    - ``center``: [x] (centre-cropped to ``crop`` if larger).
    - ``ten_crop``: x from the ten_crop loader is (N, 10, C, crop, crop) -> its 10 views;
      a plain (N, C, H, W) batch is ten-cropped here. Same shapes: ``torch.cat`` them for
      one forward pass if memory allows.
    - ``multiscale``: x (N, C, H, W), usually the full image from the multiscale loader
      (one image per batch) -> one view per short side in ``scales``; with ``flip`` each
      view is followed by its mirror image. Shapes differ per scale.
    """
    if protocol == "center":
        h, w = x.shape[-2:]
        return [center_crop(x, crop) if (h, w) != (crop, crop) and min(h, w) >= crop else x]
    if protocol == "ten_crop":
        v = x if x.dim() == 5 else ten_crop(x, crop)
        return list(v.unbind(1))
    if protocol == "multiscale":
        views = []
        for s in scales:
            y = resize_short(x, s)
            views.extend([y, y.flip(-1)] if flip else [y])
        return views
    raise ValueError(f"unknown eval protocol {protocol!r}; expected one of {EVAL_PROTOCOLS}")

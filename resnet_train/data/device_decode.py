"""``data.decode: device``: JPEGs decoded on the training device (batched nvjpeg on CUDA).

The CPU path (``jpeg.load_crop`` in the loader workers) reproduces torchvision's pixels
but costs about 1.8 ms of CPU per ImageNet-sized photo; a GPU training faster than the
machine's cores can decode waits for data. Here the workers only read each file and draw
its crop from the JPEG header (the same draw as the CPU path: same seeds, same boxes), and
the main process decodes the whole batch with one ``torchvision.io.decode_jpeg`` call on the
device, then cuts, resizes (antialiased bilinear) and mirrors each crop there.

The crops are made as the CPU path's references make them: resize-then-crop (the whole image
resized, then cut) for the paper's scale augmentation and the centre crop, crop-then-resize
for RandomResizedCrop; resizing in float on the device rounds differently from the CPU
path's uint8 kernel, and nvjpeg's IDCT is not libjpeg-turbo's, so the pixels differ by
about a grey level (tests/test_device_decode.py). Files that are not plain 8-bit JPEGs, and
JPEGs cut short (no end marker: nvjpeg may fill their missing rows without an error), are
decoded in the worker the CPU way; a batch the device cannot decode (a corrupt file, or no
device memory left, which is said once) is decoded again the CPU way in the main process,
which skips, replaces and reports bad images as always.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Crop

FIXED_SIZE = ("paper", "rrc", "center")  # geometries whose samples all have the crop's size


class Encoded(NamedTuple):
    """A batch as a worker hands it over for decoding on the device."""

    key: tuple                         # (epoch, indices): what the CPU path would decode
    data: torch.Tensor                 # every JPEG's bytes, concatenated (uint8, 1-D)
    sizes: list[int]                   # bytes per sample; 0: decoded in the worker
    crops: list[Crop | None]           # the crop of each JPEG
    decoded: dict[int, np.ndarray]     # sample -> HWC crop, for files that are not JPEGs


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 CHW resized with the antialiased bilinear filter (torchvision's Resize)."""
    if x.shape[1:] == (height, width):
        return x
    y = F.interpolate(x[None].float(), size=(height, width), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


def _cut(img: torch.Tensor, crop: Crop) -> torch.Tensor:
    """The crop from a decoded CHW image, as the CPU path's reference makes it."""
    (x0, y0, x1, y1), (cw, ch) = crop.box, crop.size
    h, w = img.shape[1:]
    if crop.edge == "image":  # resize-then-crop: the box lies on the resized image's grid
        sx, sy = (x1 - x0) / cw, (y1 - y0) / ch
        rw, rh = max(round(w / sx), cw), max(round(h / sy), ch)
        left, top = min(round(x0 / sx), rw - cw), min(round(y0 / sy), rh - ch)
        out = _resize(img, rh, rw)[:, top:top + ch, left:left + cw]
    else:  # crop-then-resize (RandomResizedCrop): an integral box
        left, top, right, bottom = (int(v) for v in crop.box)
        out = _resize(img[:, top:bottom, left:right], ch, cw)
    return out.flip(-1) if crop.flip else out


def decode_jpegs(blobs: list[torch.Tensor], device: torch.device,
                 side=None) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call (RGB, CHW uint8 on ``device``); on CUDA on ``side``,
    a ``torch.cuda.Stream`` the caller keeps for its decodes (None: a new one).

    torchvision's batched nvjpeg decode allocates its outputs on the current stream and
    writes them from a stream of its own that does not wait for the current one
    (pytorch/vision#9606): memory that kernels still queued there will read (the training
    step never waits for the device) could be overwritten. With a side stream current, the
    outputs come from memory only decodes used; they are handed to the current stream after
    the decode, and kept from reuse until its work on them is done.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode():
        with warnings.catch_warnings():  # deprecated in favour of torchcodec from 0.29
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    if device.type != "cuda":
        return decode()
    main = torch.cuda.current_stream(device)
    side = side if side is not None else torch.cuda.Stream(device)
    try:
        with torch.cuda.stream(side):
            images = decode()
    except RuntimeError:
        torch.cuda.synchronize(device)  # a batch given up may still be writing its outputs
        raise
    main.wait_stream(side)
    for img in images:
        img.record_stream(main)
    return images


def decode_on_device(batch: Encoded, device: torch.device, side=None) -> torch.Tensor:
    """The batch as uint8 NCHW on ``device`` (``side``: see ``decode_jpegs``). RuntimeError
    if a JPEG does not decode."""
    n = len(batch.sizes)
    jpegs = [i for i, s in enumerate(batch.sizes) if s]
    parts = batch.data.split([batch.sizes[i] for i in jpegs]) if jpegs else []
    size = next(c.size for c in batch.crops if c is not None) if jpegs else \
        next(iter(batch.decoded.values())).shape[1::-1]
    out = torch.empty((n, 3, size[1], size[0]), dtype=torch.uint8, device=device)
    images = decode_jpegs(list(parts), device, side) if jpegs else []
    for i, img in zip(jpegs, images, strict=True):
        out[i] = _cut(img, batch.crops[i])
    for i, arr in batch.decoded.items():
        out[i] = torch.from_numpy(np.array(arr)).permute(2, 0, 1).to(device)
    return out

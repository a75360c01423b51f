"""Byte-level JPEG reading and the decode-only-the-box path (``load_crop``).

Given a crop box from ``geometry``, ``load_crop`` decodes and resizes only what the box
needs. JPEGs are decoded by libjpeg-turbo (torchvision.io), only down to the last row the
filter reads (the frame height in the header is lowered), and resized by torch's
antialiased bilinear kernel (PIL's filter, about 3x faster than PIL's); with
``data.jpeg_draft`` PIL ``draft`` decodes at 1/2..1/8 scale when the box shrinks by 2x or
more. Other formats go through PIL.
The marker parsing and the file-descriptor handling this needs are kept here, apart from
the geometry, because they are about the file format and the worker process, not the crop.
The result must equal torchvision's resize-then-crop (or, for RandomResizedCrop,
crop-then-resize) within rounding: "crop before resize, exactly" in ``docs/architecture.md``.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings

import numpy as np
import torch

from .geometry import Crop


def _jpeg_sof(data) -> tuple[int, int, int, int, int] | None:
    """(width, height, offset of the height field, rows of an MCU row, MCU rows to decode
    below the crop) from a JPEG's SOF marker, or None if ``data`` is not a plain JPEG."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            ncomp = data[i + 9] if i + 9 < n else 0
            vmax = max([data[j] & 15 for j in range(i + 11, min(i + 10 + 3 * ncomp, n), 3)],
                       default=0)
            # Progressive: libjpeg-turbo smooths blocks whose coefficients the file never
            # fully refines using the block rows up to two below (after chroma upsampling
            # one more): keep three MCU rows below the crop instead of one.
            extra = 3 if marker in (0xC2, 0xC6, 0xCA, 0xCE) else 1
            return (int.from_bytes(data[i + 7:i + 9], "big"),
                    int.from_bytes(data[i + 5:i + 7], "big"), i + 5, 8 * max(vmax, 1), extra)
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # no length field
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def ends_complete(data: bytes) -> bool:
    """Whether a JPEG's bytes end with its EOI marker (zero padding allowed): a truncated
    file does not. libjpeg-turbo refuses a truncated file whatever is decoded of it;
    nvjpeg may fill the missing rows without an error."""
    return data.rstrip(b"\0").endswith(b"\xff\xd9")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, or None if ``data`` is not a plain JPEG."""
    sof = _jpeg_sof(data)
    return None if sof is None else sof[:2]


def decode_rows(y1: int, h: int, mcu: int = 16, extra: int = 1) -> int:
    """How many top rows of an ``h``-row JPEG to decode for output rows [0, y1) exactly.

    ``mcu`` is the height of an MCU row (8 x the largest vertical sampling factor). Decoding
    stops ``extra`` whole MCU rows below the one holding row y1 - 1 (1; 3 for progressive
    files), so chroma upsampling and block smoothing see the real rows below it: the rows
    kept are bit-identical to a full decode (tested for every y1 on baseline, progressive
    and partly refined progressive files).
    """
    return min(h, -(-y1 // mcu) * mcu + extra * mcu)


def load_crop(path: str, choose, draft: bool = False) -> np.ndarray:
    """Decode ``path`` and resample only what the ``geometry.Crop`` that ``choose(w, h)``
    picks for the image's size needs: HWC uint8 RGB of the crop's size, mirrored if flip.

    The result equals the crop's torchvision reference within rounding: resize-then-crop
    (``edge="image"``: the filter's support reaches past the box up to the image border) or
    crop-then-resize (``edge="box"``). JPEGs are decoded by libjpeg-turbo (torchvision.io)
    and resampled by torch's antialiased bilinear kernel, PIL's filter at about a third of
    PIL's cost. In loader workers only the rows down to the last one the filter reads are
    decoded (``decode_rows``): the frame height in the header is lowered, so libjpeg stops
    there and skims the rest of the file for its end marker. With ``draft``, a JPEG whose box
    shrinks by 2x or more is instead decoded at 1/2, 1/4 or 1/8 scale in the DCT (PIL
    ``draft``): faster, but not the reference's pixels. Other formats, and JPEGs torchvision
    cannot read, go through PIL. A JPEG of other than 8-bit precision raises ValueError naming it.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    sof = _jpeg_sof(data)
    if sof is not None:
        # A 12-bit JPEG: neither decoder reads one and PIL would say only "cannot identify
        # image file"; the reason is the SOF's precision byte (just before the frame height).
        precision = data[sof[2] - 1]
        if precision != 8:
            raise ValueError(f"unsupported JPEG data precision {precision}")
        crop = Crop(*choose(sof[0], sof[1]))  # choose once: it draws from the RNG
        box, size = crop.box, crop.size
        if not draft or min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]) < 2:
            try:
                return _torch_crop(data, sof, crop)
            except RuntimeError:
                pass  # PIL decides: a readable exotic JPEG, or an error with its reason
        choose = lambda w, h: crop  # noqa: E731
    return _pil_crop(io.BytesIO(data), choose, draft)


def torch_decoder_missing() -> str | None:
    """None, or why JPEGs go through PIL here: torchvision.io.decode_jpeg (deprecated from
    0.29 in favour of TorchCodec) is gone from this torchvision."""
    if _jpeg_decoder() is not None:
        return None
    import torchvision
    return f"torchvision {torchvision.__version__} has no torchvision.io.decode_jpeg"


@functools.lru_cache(maxsize=1)
def _jpeg_decoder():
    """torchvision's libjpeg-turbo decoder, or None where this torchvision has none."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(buf: bytearray) -> torch.Tensor:
        with warnings.catch_warnings():  # deprecated in favour of torchcodec from 0.29
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(buf, dtype=torch.uint8), mode=ImageReadMode.RGB)
    return decode


@functools.lru_cache(maxsize=1)
def _devnull() -> int:
    return os.open(os.devnull, os.O_WRONLY)


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


def _quietly(fn, *args):
    """fn(*args) with file descriptor 2 on /dev/null: libjpeg prints a 'Corrupt JPEG data:
    extraneous bytes' line to stderr for every shortened frame (called in loader workers
    only, which run nothing else meanwhile, so nothing else is hidden)."""
    saved = os.dup(2)
    try:
        os.dup2(_devnull(), 2)
        return fn(*args)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _support_end(n: int, scale: float, limit: int) -> int:
    """One past the last source pixel that outputs [0, n) of a resize by ``scale`` (output
    per source pixel) read: the centre of output n-1 plus the filter's radius (bilinear: 1,
    widened by the shrink factor when antialiasing), as torch and PIL compute it, plus one
    pixel against rounding."""
    centre = (n - 0.5) / scale
    return min(limit, int(centre + max(1.0 / scale, 1.0) + 0.5) + 1)


def _grid_origin(first: int, n: int, resized: int) -> tuple[int, int]:
    """The source pixel at or before ``first`` (the first one the window reads) where a
    pixel of the resized grid starts too, and that grid pixel: multiples of
    n / gcd(n, resized). torch's kernel only computes outputs from its input's first pixel,
    so starting the input there, not at the image's edge, saves the outputs before it."""
    step = n // math.gcd(n, resized)
    origin = max(0, first) // step * step
    return origin, origin // step * (resized // math.gcd(n, resized))


def _grid_window(crop, w: int, h: int):
    """For an ``edge="image"`` crop: the source region (x0, y0, x1, y1) to resize, the resize
    factors (sy, sx), and the window's offset (top, left) in the region's resized grid.
    Raises RuntimeError (PIL takes over) for a box off the resized pixel grid."""
    (bx0, by0, bx1, by1), (ow, oh) = crop.box, crop.size
    sx, sy = ow / (bx1 - bx0), oh / (by1 - by0)
    left, top, rw, rh = bx0 * sx, by0 * sy, w * sx, h * sy
    if max(abs(v - round(v)) for v in (left, top, rw, rh)) > 1e-6:
        raise RuntimeError("box not on the resized pixel grid")
    left, top, rw, rh = int(round(left)), int(round(top)), int(round(rw)), int(round(rh))
    # first source pixel read by window pixel 0: its centre minus the filter's radius
    x0, left0 = _grid_origin(int((left + 0.5) / sx - max(1.0 / sx, 1.0)) - 1, w, rw)
    y0, top0 = _grid_origin(int((top + 0.5) / sy - max(1.0 / sy, 1.0)) - 1, h, rh)
    x1, y1 = _support_end(left + ow, sx, w), _support_end(top + oh, sy, h)
    return (x0, y0, x1, y1), (sy, sx), (top - top0, left - left0)


def _torch_crop(data: bytes, sof, crop) -> np.ndarray:
    """The torchvision-decoder path of ``load_crop``.

    ``edge="image"``: the window of the whole image resized by the crop's factors, exactly:
    the region handed to torch's kernel starts where source and resized grids meet
    (``_grid_window``) and ends at the last pixel the window's filter reads, so the support
    is cut at the image's edge, never the box's. ``edge="box"``: the integral box cut out,
    then resized.
    """
    decode = _jpeg_decoder()
    if decode is None:
        raise RuntimeError("no torchvision JPEG decoder")
    w, h, height_at, mcu, extra = sof
    if w < 1 or h < 1:
        raise RuntimeError("no frame size in the header")
    box, (ow, oh), flip = crop.box, crop.size, crop.flip
    if crop.edge == "image":
        (x0, y0, x1, y1), scales, (top, left) = _grid_window(crop, w, h)
    else:
        x0, y0 = min(max(int(round(box[0])), 0), w - 1), min(max(int(round(box[1])), 0), h - 1)
        x1, y1 = max(min(int(round(box[2])), w), x0 + 1), max(min(int(round(box[3])), h), y0 + 1)
        scales, top, left = None, 0, 0
    img = _decode_top(decode, data, y1, h, height_at, mcu, extra, w)
    # (1, 3, h, w) with true channels_last strides (img[None] would give the batch dim a
    # stride of 3, and torch would take the 3x slower NCHW route and return NCHW).
    region = img.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)[:, :, y0:y1, x0:x1]
    out = _resize(region, (top + oh, left + ow), scales)[:, :, top:, left:]
    if flip:  # torch's flip is vectorised; copying a mirrored numpy view is 10x slower
        out = out.flip(3)
    return out[0].permute(1, 2, 0).numpy()  # HWC


def _decode_top(decode, data, rows_needed, h, height_at, mcu, extra, w) -> torch.Tensor:
    """(3, rows, w) uint8: the JPEG decoded down to at least ``rows_needed`` rows."""
    buf = bytearray(data)
    rows = decode_rows(rows_needed, h, mcu, extra)
    # Only a complete file (ending in EOI) is shortened: a truncated one then fails here
    # whatever the box, as a full decode does, instead of passing for boxes near the top.
    # Only in a loader worker: there nothing else writes to stderr while it is silenced.
    if rows < h and _in_worker() and ends_complete(data):
        buf[height_at:height_at + 2] = rows.to_bytes(2, "big")
        img = _quietly(decode, buf)
    else:
        rows = h
        img = decode(buf)  # (3, H, W) over HWC memory
    if tuple(img.shape[-2:]) != (rows, w):
        raise RuntimeError("header size differs from the decoded size")
    return img


def _resize(region: torch.Tensor, size: tuple[int, int], scales=None) -> torch.Tensor:
    """Bilinear resize of (1, 3, H, W) uint8 to ``size`` (h, w); ``scales`` (output per
    source pixel, y and x) fixes the sampling grid where ``size`` is only its top-left part
    (F.interpolate takes a size or a scale, not both; the aten ops take both)."""
    if scales is None:
        scales = (size[0] / region.shape[-2], size[1] / region.shape[-1])
    # torch's uint8 kernel skips an axis whose output length equals its input length,
    # whatever the scale: ask for one more output there (only a scale of 1 is a copy).
    asked = [n + (n == m and s != 1.0)
             for n, m, s in zip(size, region.shape[-2:], scales, strict=True)]
    if asked == list(region.shape[-2:]):
        return region
    # Antialiasing only changes a downscale; the plain kernel is faster and equal up.
    if scales[0] < 1.0 or scales[1] < 1.0:
        out = torch.ops.aten._upsample_bilinear2d_aa(region, asked, False, *scales)
    else:
        out = torch.ops.aten.upsample_bilinear2d(region, asked, False, *scales)
    return out[:, :, :size[0], :size[1]]


def _pil_crop(fp, choose, draft: bool = False) -> np.ndarray:
    """The PIL path: PIL's box resize is resize-then-crop; an ``edge="box"`` crop is cut
    out first. With ``draft``, a JPEG whose box shrinks 2x or more is decoded at 1/2..1/8
    scale in the DCT: faster, but the DCT's downscale is not the bilinear filter's."""
    from PIL import Image

    with Image.open(fp) as img:
        w, h = img.size
        box, size, flip, edge = Crop(*choose(w, h))
        x0, y0, x1, y1 = box
        k = int(min((x1 - x0) / size[0], (y1 - y0) / size[1]))
        if draft and k >= 2 and img.format == "JPEG":
            # draft never reduces by more than k: W // ceil(W/k) <= k.
            got = img.draft("RGB", (-(-w // k), -(-h // k)))
            if got is not None:
                s = w / got[1][2]  # the scale the decoder uses (1, 2, 4 or 8)
                box = (x0 / s, y0 / s, x1 / s, y1 / s)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if edge == "box":
            img = img.crop(tuple(int(round(v)) for v in box))
            box = None
        out = img.resize(size, Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)

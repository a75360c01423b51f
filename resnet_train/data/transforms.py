"""Image transforms: crop geometry for loader workers, batched ops for the device, eval views.

Decision 2 of DESIGN.md: loaders hand over uint8; conversion, mean subtraction, optional
std division, colour jitter and AlexNet PCA lighting run in ``DevicePrep``, batched, on the
training device. Decision 4: workers pick the crop window in *source* coordinates and
resize only that box (``crop_box_*`` + ``load_crop``), which has the distribution of
resize-then-crop at a fraction of the cost. JPEGs are decoded by libjpeg-turbo, only down
to the box's bottom row, and the box resized by torch's antialiased bilinear kernel (PIL's
filter, about 3x faster than PIL's); PIL ``draft`` decodes at 1/2..1/8 scale when the box
shrinks by 2x or more.

Evaluation protocols (``resnet-eval``, ``data.val.protocol``):

- ``center``: short side -> ``val.resize``, centre crop ``val.crop`` (one view).
- ``ten_crop``: short side -> ``val.resize``, then ``ten_crop``: the four corners and the
  centre, then the horizontal flips of those five, in that order (10 views).
- ``multiscale``: the whole image, short side resized to each of ``val.scales`` (paper:
  224, 256, 384, 480, 640) for the fully-convolutional network; optionally with flips.

``eval_views(x, protocol, ...)`` turns one loader batch into a list of view batches of the
same images in the same order; the score of an image is the mean of its views' scores.
"""

from __future__ import annotations

import functools
import io
import math
import os
import random
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet RGB statistics in [0, 1] (torchvision's) and the AlexNet PCA of RGB pixels
# (eigenvalues for pixel values in [0, 1]; the columns of the matrix are eigenvectors).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

# He et al. 2015, section 3.4: fully-convolutional testing at these short sides.
MULTI_SCALES = (224, 256, 384, 480, 640)
EVAL_PROTOCOLS = ("center", "ten_crop", "multiscale")
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


# --------------------------------------------------------------------------- on the device


class DevicePrep:
    """uint8 NCHW batch on the device -> float batch, normalised, optionally jittered and lit.

    ``mean`` is either 3 per-channel values or a (3, H, W) per-pixel mean image (the
    ResNet paper's CIFAR recipe; resized bilinearly if a batch has another size); ``std``
    may be None (mean subtraction only). Values are in [0, 1] units. ``color_jitter`` s
    scales brightness, contrast and saturation (in that order) by factors drawn from
    U[1-s, 1+s] per image; ``pca_alpha`` is the std of AlexNet's lighting noise. Both draw
    from ``gen`` so a step's augmentation is a pure function of its generator's seed.

    ``reuse_output``: the float batch is written into the same buffer every call (one per
    shape and layout), so a returned batch is valid until the next call. Meant for a CPU
    device, where a fresh batch-sized allocation every step costs its page faults (on
    CUDA the caching allocator already reuses memory).
    """

    def __init__(self, mean, std=None, pca_alpha: float = 0.0, channels_last: bool = False,
                 device: torch.device | str = "cpu", color_jitter: float = 0.0,
                 reuse_output: bool = False):
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
        self.mean = mean_t.view(1, 3, 1, 1) if mean_t.dim() == 1 else mean_t.unsqueeze(0)
        self.std = None if std is None else torch.as_tensor(
            std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.pca_alpha = pca_alpha
        self.color_jitter = color_jitter
        self.eigval = torch.tensor(IMAGENET_EIGVAL, device=device)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC, device=device)
        self.channels_last = channels_last
        # x/255 - mean) / std == (x - 255 mean) * 1/(255 std): two in-place passes after the
        # uint8 -> float conversion instead of four.
        self._offset = self.mean * 255.0
        self._scale = 1.0 / (255.0 * (self.std if self.std is not None
                                      else torch.ones(1, 3, 1, 1, device=device)))
        self._resized_offsets: dict[tuple[int, int], torch.Tensor] = {}
        self.reuse_output = reuse_output
        self._outputs: dict[tuple, torch.Tensor] = {}

    def _float_copy(self, x: torch.Tensor) -> torch.Tensor:
        """x as a new float32 tensor of the same layout (the in-place ops below need one)."""
        if not self.reuse_output:
            return x.float() if x.dtype != torch.float32 else x.clone()
        key = (tuple(x.shape), tuple(x.stride()), x.device)
        out = self._outputs.get(key)
        if out is None:
            if len(self._outputs) >= 4:  # e.g. a short last batch: keep a few shapes only
                self._outputs.clear()
            # Never an inference tensor (if first made under evaluate's inference_mode): one
            # could not be written outside it, e.g. by the block-norm logging's prep call.
            with torch.inference_mode(False):
                out = torch.empty_strided(x.shape, x.stride(), dtype=torch.float32,
                                          device=x.device)
            self._outputs[key] = out
        return out.copy_(x)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        x = self._float_copy(x)  # in-place ops below
        if self.color_jitter > 0:
            x = color_jitter(x, self.color_jitter, gen)
        offset = self._offset_for(x.shape[-2:])
        if self.pca_alpha > 0:
            offset = offset - 255.0 * self.lighting(x.shape[0], gen).view(-1, 3, 1, 1)
        x = _affine_(x, offset, self._scale)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _offset_for(self, hw) -> torch.Tensor:
        if self._offset.shape[-1] == 1 or tuple(self._offset.shape[-2:]) == tuple(hw):
            return self._offset
        key = (int(hw[0]), int(hw[1]))
        if key not in self._resized_offsets:  # a per-pixel mean at another size (multiscale)
            if len(self._resized_offsets) >= 64:  # full images come in many sizes: bound it
                self._resized_offsets.clear()
            self._resized_offsets[key] = F.interpolate(
                self._offset, size=key, mode="bilinear", align_corners=False, antialias=True)
        return self._resized_offsets[key]

    def lighting(self, n: int, gen: torch.Generator | None) -> torch.Tensor:
        """Per-image RGB offsets eigvec @ (alpha * eigval), alpha ~ N(0, pca_alpha) (AlexNet)."""
        alpha = torch.randn(n, 3, generator=gen, device=self.eigval.device) * self.pca_alpha
        return (alpha * self.eigval) @ self.eigvec.T


def _affine_(x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place (x - offset) * scale, x (..., 3, H, W), operands (n|1, 3, h|1, w|1).

    A channels_last batch (what the folder workers produce) is processed as rows of W*3
    interleaved values so the inner loop is long and contiguous; broadcasting a (1, 3, 1, 1)
    operand over its inner dimension of 3 is several times slower on a CPU.
    """
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x.sub_(offset).mul_(scale)  # also (N, 10, C, H, W) ten-crop batches
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).view(n, h, w * c)  # the NHWC memory, no copy

    def as_rows(t):
        t = t.expand(t.shape[0], c, t.shape[2], w)
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], t.shape[2], w * c)
    rows.sub_(as_rows(offset)).mul_(as_rows(scale))
    return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast, saturation jitter of a float batch in [0, 255], per image.

    The formulas of torchvision's adjust_brightness/contrast/saturation, applied in that
    fixed order with factors U[max(0, 1-s), 1+s].
    """
    n = x.shape[0]
    f = 1.0 + (torch.rand(n, 3, generator=gen, device=x.device) * 2 - 1) * strength
    f = f.clamp_(min=0).view(n, 3, 1, 1, 1)
    b, c, s = f[:, 0], f[:, 1], f[:, 2]
    x = (x * b).clamp_(0, 255)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x * c + m * (1 - c)).clamp_(0, 255)
    return (x * s + _gray(x) * (1 - s)).clamp_(0, 255)


def pad_crop_flip_params(n: int, pad: int, flip: bool, gen: torch.Generator | None,
                         device: torch.device | str = "cpu"):
    """Per-image (row offset, column offset, flip) for a random crop of a ``pad``-padded image."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    fl = (torch.rand(n, generator=gen, device=device) < 0.5) if flip else \
        torch.zeros(n, dtype=torch.bool, device=device)
    return oy, ox, fl


class PadCropFlip:
    """A uint8 image set, zero-padded (and mirrored) once, from which a batch of random
    pad-crop-flip views is gathered in one indexing op (the CIFAR augmentation).

    The set is stored as (N, 2, C, H+2p, W+2p): the padded images and their mirror images,
    so a crop, a flip and the selection of the batch's images are a single gather through a
    strided window view. Memory: 2 x (1 + 2p/H)^2 the images (0.5 GB for CIFAR's 50k).
    """

    def __init__(self, images: torch.Tensor, pad: int, flip: bool = True):
        n, c, h, w = images.shape
        self.pad, self.flip, self.shape = pad, flip, (c, h, w)
        padded = F.pad(images, (pad, pad, pad, pad))
        store = torch.stack([padded, padded.flip(3)], 1) if flip else padded.unsqueeze(1)
        self.store = store.contiguous()
        k, hp, wp = store.shape[1], h + 2 * pad, w + 2 * pad
        # windows[i, f, oy, ox] is the (C, H, W) crop at (oy, ox) of image i, mirrored if f.
        self.windows = self.store.as_strided(
            (n, k, 2 * pad + 1, 2 * pad + 1, c, h, w),
            (k * c * hp * wp, c * hp * wp, wp, 1, hp * wp, wp, 1))

    def __call__(self, idx: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor,
                 fl: torch.Tensor) -> torch.Tensor:
        """Images ``idx``: crop at (oy, ox) of the padded image, then mirrored where ``fl``.

        A mirrored crop at ox equals the crop at 2p - ox of the mirrored padded image.
        """
        f = fl.long() if self.flip else torch.zeros_like(ox)
        ox = torch.where(fl, 2 * self.pad - ox, ox) if self.flip else ox
        return self.windows[idx, f, oy, ox]


def pad_crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, fl: torch.Tensor,
                  pad: int) -> torch.Tensor:
    """Reference (per-image loop) of the padded crop + flip, for tests and small batches."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    out = [padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(x.shape[0])]
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, fl.tolist())])


# --------------------------------------------------------------------------- in the workers
#
# A crop is (box, size, flip): the window (x0, y0, x1, y1) in source pixels and the output
# (width, height). Resizing the box to the size equals cropping the resized image, because
# PIL maps output pixel k of a box resize to x0 + (k + 0.5) * (x1 - x0) / width, and the
# filter support, clipped at the *image* border, is the same.


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
    return _box(w, h, rw, rh, left, top, cw, ch), (crop, crop), flip and rng.random() < 0.5


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
    return box, (crop, crop), flip and rng.random() < 0.5


def crop_box_center(w: int, h: int, resize: int, crop: int):
    """Validation: torchvision Resize(resize) + CenterCrop(crop) as one box."""
    rw, rh = _resized(w, h, resize)
    cw, ch = min(crop, rw), min(crop, rh)
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
    return _box(w, h, rw, rh, left, top, cw, ch), (cw, ch), False


def crop_box_resized(w: int, h: int, side: int):
    """The whole image with its short side resized to ``side`` (10-crop's input)."""
    rw, rh = _resized(w, h, side)
    return (0.0, 0.0, float(w), float(h)), (rw, rh), False


def crop_box_full(w: int, h: int, side: int):
    """The whole image with its short side reduced to ``side``; never enlarged here (each
    test scale is then resized on the device from the best pixels: one resampling)."""
    if min(w, h) <= side:
        return (0.0, 0.0, float(w), float(h)), (w, h), False
    rw, rh = _resized(w, h, side)
    return (0.0, 0.0, float(w), float(h)), (rw, rh), False


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


def load_crop(path: str, choose) -> np.ndarray:
    """Decode ``path`` and resize only the box that ``choose(w, h) -> (box, size, flip)``
    picks for the image's size: HWC uint8 RGB of that size, mirrored if flip.

    JPEGs are decoded by libjpeg-turbo (torchvision.io) and the box, rounded to whole source
    pixels, is resized by torch's antialiased bilinear kernel: PIL's filter (equal up to
    rounding) at about a third of PIL's cost. In loader workers only the rows down to the
    box's bottom are decoded (``decode_rows``): the frame height in the header is lowered,
    so libjpeg stops there and skims the rest of the file for its end marker. When the box
    shrinks by 2x or more the JPEG is instead decoded at 1/2, 1/4 or 1/8 scale in the DCT
    (PIL ``draft``). Other formats, and JPEGs torchvision cannot read, go through PIL's
    ``resize(box=...)``.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    sof = _jpeg_sof(data)
    if sof is not None:
        crop = choose(sof[0], sof[1])  # choose once: it draws from the sample's RNG
        box, size, flip = crop
        if min((box[2] - box[0]) / size[0], (box[3] - box[1]) / size[1]) < 2:
            try:
                return _torch_crop(data, sof, box, size, flip)
            except RuntimeError:
                pass  # PIL decides: a readable exotic JPEG, or an error with its reason
        choose = lambda w, h: crop  # noqa: E731
    return _pil_crop(io.BytesIO(data), choose)


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


def _torch_crop(data: bytes, sof, box, size, flip: bool) -> np.ndarray:
    decode = _jpeg_decoder()
    if decode is None:
        raise RuntimeError("no torchvision JPEG decoder")
    w, h, height_at, mcu, extra = sof
    if w < 1 or h < 1:
        raise RuntimeError("no frame size in the header")
    x0, y0 = min(max(int(round(box[0])), 0), w - 1), min(max(int(round(box[1])), 0), h - 1)
    x1, y1 = max(min(int(round(box[2])), w), x0 + 1), max(min(int(round(box[3])), h), y0 + 1)
    buf = bytearray(data)
    rows = decode_rows(y1, h, mcu, extra)
    # Only a complete file (ending in EOI) is shortened: a truncated one then fails here
    # whatever the box, as a full decode does, instead of passing for boxes near the top.
    # Only in a loader worker: there nothing else writes to stderr while it is silenced.
    if rows < h and _in_worker() and data.rstrip(b"\0").endswith(b"\xff\xd9"):
        buf[height_at:height_at + 2] = rows.to_bytes(2, "big")
        img = _quietly(decode, buf)
    else:
        rows = h
        img = decode(buf)  # (3, H, W) over HWC memory
    if tuple(img.shape[-2:]) != (rows, w):
        raise RuntimeError("header size differs from the decoded size")
    # (1, 3, h, w) with true channels_last strides (img[None] would give the batch dim a
    # stride of 3, and torch would take the 3x slower NCHW route and return NCHW).
    region = img.permute(1, 2, 0).unsqueeze(0).permute(0, 3, 1, 2)[:, :, y0:y1, x0:x1]
    if (y1 - y0, x1 - x0) != (size[1], size[0]):
        # Antialiasing only changes a downscale; the plain kernel is faster and equal up.
        down = y1 - y0 > size[1] or x1 - x0 > size[0]
        region = F.interpolate(region, size=(size[1], size[0]), mode="bilinear",
                               align_corners=False, antialias=down)
    out = region[0].permute(1, 2, 0).numpy()  # HWC
    return out[:, ::-1] if flip else out  # a mirrored view: the batch copy reads it once


def _pil_crop(fp, choose) -> np.ndarray:
    from PIL import Image

    with Image.open(fp) as img:
        w, h = img.size
        box, size, flip = choose(w, h)
        x0, y0, x1, y1 = box
        k = int(min((x1 - x0) / size[0], (y1 - y0) / size[1]))
        if k >= 2 and img.format == "JPEG":
            # draft never reduces by more than k: W // ceil(W/k) <= k.
            got = img.draft("RGB", (-(-w // k), -(-h // k)))
            if got is not None:
                s = w / got[1][2]  # the scale the decoder uses (1, 2, 4 or 8)
                box = (x0 / s, y0 / s, x1 / s, y1 / s)
        if img.mode != "RGB":
            img = img.convert("RGB")
        out = img.resize(size, Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


# --------------------------------------------------------------------------- evaluation views


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

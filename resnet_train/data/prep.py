"""On-device batched preparation: uint8 NCHW batch in, normalised float batch out.

Loaders hand over uint8 (see "uint8 until the device" in ``docs/architecture.md``);
conversion to float, mean subtraction, optional std division, colour jitter and AlexNet PCA
lighting run in ``DevicePrep``, batched, on the training device: cheaper IPC, cheaper
workers, same maths. The dataset statistics it uses are defined here. So is the CIFAR
augmentation, for the same reason: the split is one uint8 tensor on the device and
``PadCropFlip`` gathers a batch of pad-crop-flip views in one op ("CIFAR lives in memory").
"""

from __future__ import annotations

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
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


class DevicePrep:
    """uint8 NCHW batch on the device -> float batch, normalised, optionally jittered and lit.

    ``mean`` is either 3 per-channel values or a (3, H, W) per-pixel mean image (the
    ResNet paper's CIFAR recipe; resized bilinearly if a batch has another size); ``std``
    may be None (mean subtraction only). Values are in [0, 1] units. ``color_jitter`` s
    scales brightness, contrast and saturation (in that order) by factors drawn from
    U[1-s, 1+s] per image; ``pca_alpha`` is the std of AlexNet's lighting noise. Both draw
    from ``gen`` so a step's augmentation is a pure function of its generator's seed.

    ``rank`` / ``world``: a training batch of n images is this rank's slice of a global batch
    of n * world. The draws are made for the whole global batch and the slice kept (as the
    crops are), so with a generator seeded alike on every rank an image's jitter and lighting
    do not depend on the world size: DDP over 2 ranks == one process (with accum_steps=2).

    ``reuse_output``: the float batch is written into the same buffer every call (one per
    shape and layout), so a returned batch is valid until the next call. Meant for a CPU
    device, where a fresh batch-sized allocation every step costs its page faults (on
    CUDA the caching allocator already reuses memory).
    """

    def __init__(self, mean, std=None, pca_alpha: float = 0.0, channels_last: bool = False,
                 device: torch.device | str = "cpu", color_jitter: float = 0.0,
                 reuse_output: bool = False, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        self.rank, self.world, self.device = rank, world, device
        self.set_stats(mean, std)
        self.pca_alpha = pca_alpha
        self.color_jitter = color_jitter
        self.eigval = torch.tensor(IMAGENET_EIGVAL, device=device)
        self.eigvec = torch.tensor(IMAGENET_EIGVEC, device=device)
        self.channels_last = channels_last
        self.reuse_output = reuse_output
        self._outputs: dict[tuple, torch.Tensor] = {}

    def set_stats(self, mean, std=None) -> None:
        """Normalise with ``mean`` ((3,) or a (3, H, W) mean image, in [0, 1]) and ``std``."""
        device = self.device
        mean_t = torch.as_tensor(mean, dtype=torch.float32).to(device)
        self.mean = mean_t.view(1, 3, 1, 1) if mean_t.dim() == 1 else mean_t.unsqueeze(0)
        self.std = None if std is None else torch.as_tensor(
            std, dtype=torch.float32).to(device).view(1, 3, 1, 1)
        # x/255 - mean) / std == (x - 255 mean) * 1/(255 std): two in-place passes after the
        # uint8 -> float conversion instead of four.
        self._offset = self.mean * 255.0
        self._scale = 1.0 / (255.0 * (self.std if self.std is not None
                                      else torch.ones(1, 3, 1, 1, device=device)))
        self._resized_offsets: dict[tuple[int, int], torch.Tensor] = {}

    def stats(self) -> dict:
        """{"mean": (3,) or (3, H, W), "std": (3,) or None}: CPU float32, for checkpoints."""
        m = self.mean[0]
        mean = m.flatten() if tuple(m.shape[-2:]) == (1, 1) else m
        return {"mean": mean.cpu().clone(),
                "std": None if self.std is None else self.std.flatten().cpu().clone()}

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
        n = x.shape[0]
        mine = slice(self.rank * n, (self.rank + 1) * n)  # this rank's part of the global draws
        if self.color_jitter > 0:
            factors = jitter_factors(n * self.world, self.color_jitter, gen, x.device)[mine]
            x = color_jitter(x, self.color_jitter, factors=factors)
        offset = self._offset_for(x.shape[-2:])
        if self.pca_alpha > 0:
            offset = offset - 255.0 * self.lighting(n * self.world, gen)[mine].view(-1, 3, 1, 1)
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


def jitter_factors(n: int, strength: float, gen: torch.Generator | None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 3) brightness, contrast, saturation factors U[max(0, 1-s), 1+s]."""
    f = 1.0 + (torch.rand(n, 3, generator=gen, device=device) * 2 - 1) * strength
    return f.clamp_(min=0)


def color_jitter(x: torch.Tensor, strength: float, gen: torch.Generator | None = None,
                 factors: torch.Tensor | None = None) -> torch.Tensor:
    """Brightness, contrast, saturation jitter of a float batch in [0, 255], per image.

    The formulas of torchvision's adjust_brightness/contrast/saturation, applied in that
    fixed order with ``factors`` (drawn from ``gen`` by ``jitter_factors`` if not given).
    """
    n = x.shape[0]
    f = jitter_factors(n, strength, gen, x.device) if factors is None else factors
    f = f.view(n, 3, 1, 1, 1)
    b, c, s = f[:, 0], f[:, 1], f[:, 2]
    x = (x * b).clamp_(0, 255)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x * c + m * (1 - c)).clamp_(0, 255)
    return (x * s + _gray(x) * (1 - s)).clamp_(0, 255)


# --------------------------------------------------------------------------- CIFAR pad-crop-flip


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
    return torch.stack([o.flip(-1) if f else o for o, f in zip(out, fl.tolist(), strict=True)])

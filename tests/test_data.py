"""Crop geometry, box resize vs resize-then-crop (jpeg), device prep, eval views."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from resnet_train.data import geometry as G
from resnet_train.data import jpeg as J
from resnet_train.data import prep as P
from resnet_train.data import views as V
from resnet_train.data.sampling import mix_seed

# The device of the on-device prep tests: CUDA where there is one (scripts/gpu_check.sh
# runs them there: the lighting and jitter draws on a CUDA generator).
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def smooth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients: resampling differences stay small on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 100 * np.sin(xx / w * a * 4 + yy / h * b * 4 + p * 3)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------- worker geometry


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("seed", range(4))
def test_paper_box_resize_matches_resize_then_crop(tmp_path, seed, fmt):
    """PNG: PIL's resize(box=); JPEG: torch's kernel on the grid-aligned region. Both equal
    torchvision's whole-image resize, then crop, within rounding."""
    path = tmp_path / f"img.{fmt}"
    smooth_image(500, 375, seed).save(path, quality=95)
    img = Image.open(path).convert("RGB")
    choose = lambda w, h: G.crop_box_paper(w, h, (256, 480), 224, True, random.Random(seed))  # noqa: E731
    ours = J.load_crop(str(path), choose)
    # The reference draws the same numbers in the same order: side, top, left, flip.
    rng = random.Random(seed)
    side = rng.randint(256, 480)
    ref = TF.resize(img, side)  # torchvision: whole image, short side -> side
    top, left = rng.randint(0, ref.height - 224), rng.randint(0, ref.width - 224)
    ref = TF.crop(ref, top, left, 224, 224)
    if rng.random() < 0.5:
        ref = TF.hflip(ref)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert diff(ours, ref) < 0.05 and maxdiff(ours, ref) <= 2


def test_jpeg_fast_path_falls_back_to_pil(tmp_path, monkeypatch):
    smooth_image(300, 200, 3).save(tmp_path / "a.jpg", quality=95)
    choose = lambda w, h: G.crop_box_center(w, h, 180, 160)  # noqa: E731
    fast = J.load_crop(str(tmp_path / "a.jpg"), choose)
    assert J.jpeg_size(open(tmp_path / "a.jpg", "rb").read()) == (300, 200)
    monkeypatch.setattr(J, "_jpeg_decoder", lambda: None)  # a torchvision without decoders
    slow = J.load_crop(str(tmp_path / "a.jpg"), choose)
    assert fast.shape == slow.shape == (160, 160, 3)
    assert diff(fast, slow) < 0.5


JPEG_FLAVOURS = {  # Pillow save options: chroma subsampling, progressive, restart markers
    "420": dict(quality=85), "444": dict(quality=90, subsampling=0),
    "422": dict(quality=80, subsampling=1), "gray": dict(quality=85),
    "progressive": dict(quality=85, progressive=True),
    "progressive444": dict(quality=75, progressive=True, subsampling=0),
    "progressive_gray": dict(quality=85, progressive=True),
    "restart": dict(quality=85, restart_marker_rows=1),
}


def _full_decode(data: bytes) -> torch.Tensor:
    return J._jpeg_decoder()(bytearray(data))


def keep_scans(data: bytes, n: int) -> bytes:
    """The JPEG with only its first n scans (+ EOI): a legal progressive file whose
    coefficients are never fully refined, which libjpeg decodes with block smoothing."""
    i, scans = 2, 0
    while True:
        assert data[i] == 0xFF
        marker = data[i + 1]
        if marker == 0xDA:  # SOS: header, then entropy-coded data up to the next marker
            if scans == n:
                return data[:i] + b"\xff\xd9"
            scans += 1
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            while not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):
                i += 1
        elif marker == 0xD9:
            raise ValueError(f"only {scans} scans")
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")


@pytest.mark.parametrize("flavour", sorted(JPEG_FLAVOURS) + ["partly_refined_444",
                                                            "partly_refined_420",
                                                            "partly_refined_gray"])
def test_partial_jpeg_decode_rows_are_bit_identical(tmp_path, flavour, capfd):
    """Lowering the frame height decodes the top rows exactly as a full decode does, for
    every crop bottom y1."""
    img = smooth_image(301, 203, 5)
    noise = np.random.default_rng(0).integers(-40, 40, (203, 301, 3))
    img = Image.fromarray((np.asarray(img, np.int64) + noise).clip(0, 255).astype(np.uint8))
    if flavour.endswith("gray"):
        img = img.convert("L")
    if flavour.startswith("partly_refined"):
        sub = {"444": 0, "420": 2, "gray": 2}[flavour.rsplit("_", 1)[1]]
        img.save(tmp_path / "full.jpg", "JPEG", quality=85, progressive=True, subsampling=sub)
        (tmp_path / "a.jpg").write_bytes(keep_scans((tmp_path / "full.jpg").read_bytes(),
                                                    2 if sub != 2 else 4))
    else:
        img.save(tmp_path / "a.jpg", **JPEG_FLAVOURS[flavour])
    data = (tmp_path / "a.jpg").read_bytes()
    w, h, at, mcu, extra = J._jpeg_sof(data)
    assert (w, h) == (301, 203) and int.from_bytes(data[at:at + 2], "big") == 203
    progressive = "progressive" in flavour or "refined" in flavour
    assert extra == (3 if progressive else 1)
    full = _full_decode(data)
    shortened = 0
    for y1 in range(1, h + 1):
        rows = J.decode_rows(y1, h, mcu, extra)
        buf = bytearray(data)
        buf[at:at + 2] = rows.to_bytes(2, "big")
        part = J._quietly(J._jpeg_decoder(), buf)
        assert part.shape == (3, rows, w)
        assert torch.equal(part[:, :y1], full[:, :y1]), (flavour, y1)
        shortened += rows < h
    assert shortened >= 100  # most of these really decoded fewer rows
    assert "Corrupt JPEG" not in capfd.readouterr().err


def libjpeg_turbo_version() -> tuple[int, int] | None:
    """(major, minor) of the libjpeg-turbo bundled with this torchvision wheel, from its
    version string; None where it is not bundled (a build against the system's)."""
    import glob
    import os
    import re

    import torchvision
    for lib in glob.glob(os.path.dirname(torchvision.__file__) + ".libs/libjpeg*.so*"):
        with open(lib, "rb") as fh:
            m = re.search(rb"libjpeg-turbo version (\d+)\.(\d+)", fh.read())
        if m:
            return int(m[1]), int(m[2])
    return None


def test_partly_refined_progressive_jpeg_needs_the_wider_margin(tmp_path):
    """The file kind above where one MCU row below the crop is not enough: libjpeg-turbo
    2.1+ (torchvision 0.29's 3.1) smooths the blocks of a partly refined progressive file
    from two block rows further down, so the test would catch a too-small margin there;
    2.0 (torchvision 0.26's, the GPU machines' here) from one, which one MCU row covers.
    The header's margin (three MCU rows) decodes every crop exactly with either."""
    noise = np.random.default_rng(2).integers(-40, 40, (203, 301, 3))
    img = Image.fromarray((np.asarray(smooth_image(301, 203, 7), np.int64) + noise).clip(
        0, 255).astype(np.uint8))
    img.save(tmp_path / "full.jpg", "JPEG", quality=85, progressive=True, subsampling=0)
    data = keep_scans((tmp_path / "full.jpg").read_bytes(), 2)
    w, h, at, mcu, extra = J._jpeg_sof(data)
    assert extra == 3
    full = _full_decode(data)
    differs = {1: 0, extra: 0}
    for y1 in range(1, h - 3 * mcu):
        for margin in differs:
            rows = J.decode_rows(y1, h, mcu, margin)
            b = bytearray(data)
            b[at:at + 2] = rows.to_bytes(2, "big")
            got = J._quietly(J._jpeg_decoder(), b)[:, :y1]
            differs[margin] += not torch.equal(got, full[:, :y1])
    assert differs[extra] == 0
    version = libjpeg_turbo_version()
    if version is not None and version < (2, 1):
        assert differs[1] == 0
    else:
        assert differs[1] > 0


def test_load_crop_decodes_only_down_to_the_box(tmp_path, monkeypatch, capfd):
    smooth_image(500, 375, 6).save(tmp_path / "a.jpg", quality=90)
    path = str(tmp_path / "a.jpg")
    top = lambda w, h: ((100.0, 15.0, 300.0, 135.0), (224, 224), True)  # noqa: E731
    in_main = J.load_crop(path, top)  # outside a loader worker: the whole frame
    monkeypatch.setattr(J, "_in_worker", lambda: True)
    heights = []
    real = J._jpeg_decoder()
    monkeypatch.setattr(J, "_jpeg_decoder", lambda: lambda buf: heights.append(
        int.from_bytes(buf[J._jpeg_sof(buf)[2]:J._jpeg_sof(buf)[2] + 2], "big")) or real(buf))
    bottom = lambda w, h: ((100.0, 200.0, 300.0, 375.0), (224, 224), False)  # noqa: E731
    got_top, got_bottom = J.load_crop(path, top), J.load_crop(path, bottom)
    # The filter reads rows up to 136 (box bottom 135 + its radius): that MCU row ends at 144,
    # + one MCU row; capped at h.
    assert heights == [160, 375]
    assert np.array_equal(got_top, in_main)
    # Same pixels as the whole-image decode.
    monkeypatch.setattr(J, "decode_rows", lambda y1, h, mcu, extra: h)
    assert np.array_equal(got_top, J.load_crop(path, top))
    assert np.array_equal(got_bottom, J.load_crop(path, bottom))
    print("stderr still works")
    err = capfd.readouterr().err
    assert "Corrupt JPEG" not in err and "stderr still works" not in err  # print -> stdout
    import sys
    print("after", file=sys.stderr)
    assert capfd.readouterr().err == "after\n"


def test_truncated_jpeg_fails_whatever_the_box(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "_in_worker", lambda: True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 4])
    heights = []
    real = J._jpeg_decoder()
    monkeypatch.setattr(J, "_jpeg_decoder", lambda: lambda b: heights.append(
        int.from_bytes(b[J._jpeg_sof(b)[2]:J._jpeg_sof(b)[2] + 2], "big")) or real(b))
    for box in [(0.0, 0.0, 100.0, 40.0), (0.0, 150.0, 100.0, 200.0)]:  # top, bottom
        with pytest.raises(OSError, match="truncated"):
            J.load_crop(str(tmp_path / "t.jpg"), lambda w, h, box=box: (box, (50, 50), False))
    assert heights == [200, 200]  # never shortened: no end-of-image marker


def test_center_box_matches_torchvision_resize_center_crop(tmp_path):
    img = smooth_image(333, 500, 1)  # portrait
    img.save(tmp_path / "p.png")
    ours = J.load_crop(str(tmp_path / "p.png"), lambda w, h: G.crop_box_center(w, h, 256, 224))
    ref = TF.center_crop(TF.resize(img, 256), 224)
    assert ours.shape == (224, 224, 3)
    assert diff(ours, ref) < 0.05


def test_jpeg_draft_only_when_asked(tmp_path, monkeypatch):
    img = smooth_image(1200, 900, 2)
    img.save(tmp_path / "big.jpg", quality=95)
    img.save(tmp_path / "big.png")
    from PIL import JpegImagePlugin
    calls = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: calls.append(size) or real(self, mode, size))
    choose = lambda w, h: G.crop_box_center(w, h, 256, 224)  # noqa: E731  shrink 900/256 = 3.5x
    exact = J.load_crop(str(tmp_path / "big.png"), choose)
    default = J.load_crop(str(tmp_path / "big.jpg"), choose)
    assert calls == []  # data.jpeg_draft off: the full decode, torchvision's pixels
    drafted = J.load_crop(str(tmp_path / "big.jpg"), choose, draft=True)
    assert calls == [(400, 300)]  # k = 3: at most 3x smaller, so libjpeg decodes at 1/2
    assert drafted.shape == default.shape == exact.shape == (224, 224, 3)
    assert diff(default, exact) < 0.5 and diff(drafted, exact) < 2.0
    calls.clear()  # a box that shrinks < 2x decodes at full size even with draft
    J.load_crop(str(tmp_path / "big.jpg"), lambda w, h: G.crop_box_center(w, h, 600, 224), True)
    assert calls == []


def test_paper_scale_crop_flip_ranges():
    w, h, crop = 500, 375, 224
    sides, flips, x0s, x1s = [], [], [], []
    for i in range(3000):
        (x0, y0, x1, y1), size, flip, _ = G.crop_box_paper(w, h, (256, 480), crop, True,
                                                        random.Random(mix_seed(1, 0, i)))
        assert size == (crop, crop)
        assert -1e-9 <= x0 < x1 <= w + 1e-9 and -1e-9 <= y0 < y1 <= h + 1e-9
        sides.append(round(crop * h / (y1 - y0)))  # short side of the implied resized image
        flips.append(flip)
        x0s.append(x0)
        x1s.append(x1)
    sides = np.array(sides)
    assert sides.min() == 256 and sides.max() == 480
    assert abs(sides.mean() - 368) < 5            # uniform on [256, 480]
    assert abs(np.mean(sides < 368) - 0.5) < 0.04
    assert abs(np.mean(flips) - 0.5) < 0.04
    assert min(x0s) < 1 and max(x1s) > w - 1      # crops reach both edges


def test_random_resized_crop_ranges():
    w, h = 400, 300
    areas, ratios, flips = [], [], []
    for i in range(2000):
        (x0, y0, x1, y1), size, flip, _ = G.crop_box_rrc(w, h, (0.08, 1.0), (3 / 4, 4 / 3), 224,
                                                      True, random.Random(i))
        assert size == (224, 224) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        areas.append((x1 - x0) * (y1 - y0) / (w * h))
        ratios.append((x1 - x0) / (y1 - y0))
        flips.append(flip)
    assert 0.07 < min(areas) < 0.12 and max(areas) > 0.95 and max(areas) <= 1.0
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    assert abs(np.mean(flips) - 0.5) < 0.05


# --------------------------------------------------------------------------- device prep


def test_prep_normalises_like_the_formula():
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8).to(DEV)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    out = P.DevicePrep(mean, std, device=DEV)(x)
    ref = ((x.float() / 255 - torch.tensor(mean, device=DEV).view(1, 3, 1, 1))
           / torch.tensor(std, device=DEV).view(1, 3, 1, 1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert x.dtype == torch.uint8  # input untouched
    xf = x.float()
    P.DevicePrep(mean, None, device=DEV)(xf)
    assert torch.equal(xf, x.float())  # a float input is not modified in place either


def test_pca_lighting_equals_per_image_loop():
    x = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8).to(DEV)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    prep = P.DevicePrep(mean, std, pca_alpha=0.1, device=DEV)
    out = prep(x, torch.Generator(DEV).manual_seed(5))
    alpha = torch.randn(6, 3, generator=torch.Generator(DEV).manual_seed(5), device=DEV) * 0.1
    eigval = torch.tensor(P.IMAGENET_EIGVAL, device=DEV)
    eigvec = torch.tensor(P.IMAGENET_EIGVEC, device=DEV)
    m = torch.tensor(mean, device=DEV).view(3, 1, 1)
    sd = torch.tensor(std, device=DEV).view(3, 1, 1)
    for i in range(6):
        rgb = sum(eigvec[:, j] * alpha[i, j] * eigval[j] for j in range(3))  # AlexNet eq.
        ref = (x[i].float() / 255 + rgb.view(3, 1, 1) - m) / sd
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, P.DevicePrep(mean, std, device=DEV)(x))  # lighting acted


def test_prep_channels_last_fast_path_equals_contiguous():
    x = torch.randint(0, 256, (3, 3, 7, 9), dtype=torch.uint8)
    for mean in [(0.3, 0.4, 0.5), torch.rand(3, 7, 9)]:
        prep = P.DevicePrep(mean, (0.2, 0.25, 0.3), pca_alpha=0.1)
        a = prep(x, torch.Generator().manual_seed(1))
        b = prep(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert b.is_contiguous(memory_format=torch.channels_last)


def test_prep_reuse_output_writes_one_buffer_per_shape():
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    fresh, reuse = P.DevicePrep(mean, std, pca_alpha=0.1), P.DevicePrep(mean, std, pca_alpha=0.1,
                                                                        reuse_output=True)
    x1 = torch.randint(0, 256, (4, 7, 9, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # NHWC memory
    x2 = torch.randint(0, 256, (4, 7, 9, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    a = reuse(x1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, fresh(x1, torch.Generator().manual_seed(1)), atol=0, rtol=0)
    assert a.is_contiguous(memory_format=torch.channels_last)
    ptr = a.data_ptr()
    b = reuse(x2, torch.Generator().manual_seed(2))
    assert b.data_ptr() == ptr  # the same memory: a now holds the second batch
    torch.testing.assert_close(b, fresh(x2, torch.Generator().manual_seed(2)), atol=0, rtol=0)
    c = reuse(x1[:3].contiguous())  # another shape and layout: another buffer
    assert c.data_ptr() != ptr and c.is_contiguous() and c.shape == (3, 3, 7, 9)
    assert reuse(x2, torch.Generator().manual_seed(2)).data_ptr() == ptr  # still cached
    d1 = fresh(x1)
    assert fresh(x1).data_ptr() != d1.data_ptr()
    # First made under inference mode (evaluate), then written outside it (block-norm logging).
    val = P.DevicePrep(mean, std, reuse_output=True)
    with torch.inference_mode():
        inside = val(x1)
    assert not inside.is_inference()
    torch.testing.assert_close(val(x2), P.DevicePrep(mean, std)(x2), atol=0, rtol=0)


def test_pixel_mean_prep_resizes_mean_for_other_sizes():
    mean = torch.full((3, 8, 8), 0.5)
    mean[0] = 0.25
    prep = P.DevicePrep(mean, None)
    out = prep(torch.full((1, 3, 16, 12), 255, dtype=torch.uint8))
    assert out.shape == (1, 3, 16, 12)
    torch.testing.assert_close(out[0, 0], torch.full((16, 12), 0.75))
    torch.testing.assert_close(out[0, 1], torch.full((16, 12), 0.5))


def test_color_jitter_matches_torchvision_per_image():
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    out = P.color_jitter(x.float(), 0.4, torch.Generator().manual_seed(3))
    f = 1 + (torch.rand(5, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.4
    for i in range(5):
        ref = x[i].float() / 255
        ref = TF.adjust_brightness(ref, float(f[i, 0]))
        ref = TF.adjust_contrast(ref, float(f[i, 1]))
        ref = TF.adjust_saturation(ref, float(f[i, 2]))
        torch.testing.assert_close(out[i] / 255, ref, atol=1e-4, rtol=0)
    same = P.DevicePrep((0.5,) * 3, None, color_jitter=0.0)(x)
    jit = P.DevicePrep((0.5,) * 3, None, color_jitter=0.4)(x, torch.Generator().manual_seed(3))
    assert not torch.allclose(same, jit)


def test_prep_draws_per_global_batch_so_ranks_equal_one_process():
    """Jitter and lighting of a rank's slice are those of the same images in one process's
    full batch: each rank draws for the global batch (same generator seed) and keeps its part."""
    x = torch.randint(0, 256, (8, 3, 5, 6), dtype=torch.uint8).to(DEV)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def prep(rank=0, world=1, **kw):
        kw = kw or dict(pca_alpha=0.1, color_jitter=0.4)
        return P.DevicePrep(mean, std, rank=rank, world=world, device=DEV, **kw)

    def gen():  # what the trainer passes every rank for a step: a rank-independent seed
        return torch.Generator(DEV).manual_seed(mix_seed(7, 0, 3, 0, 2))

    full = prep()(x, gen())
    ranks = [prep(r, 2)(x[4 * r:4 * r + 4], gen()) for r in range(2)]
    assert torch.equal(torch.cat(ranks), full)
    # The slice matters: rank 1 drawing as a one-process batch of 4 would repeat rank 0's draws.
    assert not torch.allclose(prep()(x[4:], gen()), ranks[1])
    # Negative control: the draws vary per image (identical images come out different) ...
    same = x[:1].expand(8, -1, -1, -1).contiguous()
    out = prep()(same, gen())
    assert all(not torch.allclose(out[0], out[i]) for i in range(1, 8))
    plain = P.DevicePrep(mean, std, device=DEV)(same)
    assert torch.equal(plain[0], plain[7])
    # ... and both augmentations take part (each alone differs from both together).
    for alone in (dict(pca_alpha=0.1), dict(color_jitter=0.4)):
        assert not torch.allclose(prep(**alone)(x, gen()), full)
    with pytest.raises(ValueError, match="rank 2"):
        P.DevicePrep(mean, std, rank=2, world=2)


# --------------------------------------------------------------------------- CIFAR pad-crop-flip


def test_pad_crop_flip_gather_equals_loop_and_ranges():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    store = P.PadCropFlip(images, pad=2, flip=True)
    idx = torch.tensor([3, 0, 19, 7, 7, 11])
    oy, ox, fl = P.pad_crop_flip_params(6, 2, True, torch.Generator().manual_seed(0))
    fl = torch.tensor([True, False, True, False, True, True])
    out = store(idx, oy, ox, fl)
    assert torch.equal(out, P.pad_crop_flip(images[idx], oy, ox, fl, 2))
    # zero padding shows: an offset-0 crop has zero top rows/left columns
    out0 = store(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))
    assert out0[0, :, :2].eq(0).all() and out0[0, :, :, :2].eq(0).all()
    assert torch.equal(out0[0, :, 2:, 2:], images[0, :, :6, :6])
    oy, ox, fl = P.pad_crop_flip_params(4000, 4, True, torch.Generator().manual_seed(1))
    assert oy.min() == 0 and oy.max() == 8 and ox.min() == 0 and ox.max() == 8
    assert abs(oy.float().mean().item() - 4) < 0.15
    assert abs(fl.float().mean().item() - 0.5) < 0.03
    _, _, nofl = P.pad_crop_flip_params(100, 4, False, torch.Generator().manual_seed(1))
    assert not nofl.any()


# --------------------------------------------------------------------------- eval views


def test_ten_crop_count_and_order():
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).view(2, 3, 6, 8)
    v = V.ten_crop(x, 4)
    assert v.shape == (2, 10, 3, 4, 4)
    expect = [x[..., :4, :4], x[..., :4, 4:], x[..., 2:, :4], x[..., 2:, 4:], x[..., 1:5, 2:6]]
    for k in range(5):
        assert torch.equal(v[:, k], expect[k])
        assert torch.equal(v[:, k + 5], expect[k].flip(-1))
    single = V.ten_crop(x[0], 4)  # CHW
    assert single.shape == (10, 3, 4, 4) and torch.equal(single, v[0])
    pil = Image.fromarray(np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3))
    pv = V.ten_crop(pil, 4)
    assert pv.shape == (10, 3, 4, 4) and pv.dtype == torch.uint8
    assert torch.equal(pv[1], torch.from_numpy(np.array(pil)).permute(2, 0, 1)[:, :4, 4:])
    views = V.eval_views(x, "ten_crop", crop=4)
    assert len(views) == 10 and all(torch.equal(a, v[:, k]) for k, a in enumerate(views))
    assert all(torch.equal(a, b) for a, b in zip(V.eval_views(v, "ten_crop"), views, strict=True))


def test_multiscale_views_shapes_and_flips():
    x = torch.randint(0, 256, (1, 3, 375, 500), dtype=torch.uint8)
    views = V.eval_views(x, "multiscale", scales=V.MULTI_SCALES)
    assert [tuple(v.shape[-2:]) for v in views] == [
        (224, int(224 * 500 / 375)), (256, int(256 * 500 / 375)), (384, 512), (480, 640),
        (640, int(640 * 500 / 375))]
    assert all(v.dtype == torch.uint8 for v in views)
    flipped = V.eval_views(x, "multiscale", scales=(256, 375), flip=True)
    assert len(flipped) == 4
    assert torch.equal(flipped[1], flipped[0].flip(-1))
    assert torch.equal(flipped[2], x)  # already at that scale: untouched
    portrait = V.resize_short(torch.zeros(2, 3, 40, 30), 15)
    assert portrait.shape == (2, 3, 20, 15)
    c = V.eval_views(torch.zeros(1, 3, 10, 12), "center", crop=8)
    assert len(c) == 1 and c[0].shape == (1, 3, 8, 8)
    with pytest.raises(ValueError):
        V.eval_views(x, "five_crop")


def test_resize_short_is_antialiased_mean_preserving():
    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    y = V.resize_short(x, 16)
    assert y.shape == (1, 3, 16, 24)
    assert abs(y.float().mean() - x.float().mean()) < 1.0
    assert math.isclose(V.resize_short(x.float(), 32).mean().item(), x.float().mean().item(),
                        abs_tol=0.5)


def test_resize_on_a_grid_never_skips_an_axis():
    """torch's uint8 kernel copies an axis whose output length equals its input length,
    whatever the scale; a region cut so that it does must still be resampled."""
    img = torch.randint(0, 256, (1, 100, 100, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    s = 1.02
    full = J._resize(img, (102, 102), (s, s))
    part = J._resize(img[:, :, :, :98], (102, 98), (s, s))  # 98 columns in, 98 out
    assert torch.equal(part, full[:, :, :, :98])

"""Crops on real photographs (scikit-image's sample photos, saved as JPEG like ImageNet's)
against torchvision's transforms on the same file: resize-then-crop for the centre crop
and the paper's scale augmentation, crop-then-resize for RandomResizedCrop.

Smooth synthetic images hide resampling errors (a 1-pixel shift of a smooth gradient is
a fraction of a grey level); edges and texture in photos do not.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import skimage.data as skimage_data  # scikit-image: in the [dev] extra
import torchvision.transforms.functional as TF
from PIL import Image

from resnet_train.data import geometry as G
from resnet_train.data import jpeg as J


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
SIZES = [None, (500, 375), (333, 500), (640, 480)]  # native, and ImageNet's usual shapes


def photo(tmp_path, name: str, size, fmt: str = "jpg") -> str:
    img = Image.fromarray(getattr(skimage_data, name)()).convert("RGB")
    if size is not None:
        img = img.resize(size, Image.BICUBIC)
    path = str(tmp_path / f"{name}_{img.width}x{img.height}.{fmt}")
    img.save(path, quality=90)
    return path


def assert_close(ours, ref):
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert a.shape == b.shape
    d = np.abs(a - b)
    assert d.mean() <= 0.05 and d.max() <= 2, (d.mean(), d.max())


@pytest.mark.parametrize("worker", [False, True])  # a worker decodes only the rows it needs
@pytest.mark.parametrize("name", PHOTOS)
def test_centre_crop_equals_torchvision_on_photos(tmp_path, monkeypatch, name, worker):
    monkeypatch.setattr(J, "_in_worker", lambda: worker)
    for size in SIZES:
        path = photo(tmp_path, name, size)
        ours = J.load_crop(path, lambda w, h: G.crop_box_center(w, h, 256, 224))
        ref = TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 256), 224)
        assert_close(ours, ref)


@pytest.mark.parametrize("name", PHOTOS)
def test_paper_crop_equals_resize_then_crop_on_photos(tmp_path, monkeypatch, name):
    monkeypatch.setattr(J, "_in_worker", lambda: True)
    for k, size in enumerate(SIZES):
        path = photo(tmp_path, name, size)
        ref_img = Image.open(path).convert("RGB")
        for seed in range(3):
            seed += 10 * k
            ours = J.load_crop(path, lambda w, h, s=seed: G.crop_box_paper(
                w, h, (256, 480), 224, True, random.Random(s)))
            rng = random.Random(seed)  # the same draws in the same order: side, top, left, flip
            ref = TF.resize(ref_img, rng.randint(256, 480))
            top, left = rng.randint(0, ref.height - 224), rng.randint(0, ref.width - 224)
            ref = TF.crop(ref, top, left, 224, 224)
            assert_close(ours, TF.hflip(ref) if rng.random() < 0.5 else ref)


@pytest.mark.parametrize("fmt", ["jpg", "png"])  # torch's kernel, PIL
def test_random_resized_crop_equals_torchvision_on_photos(tmp_path, fmt):
    """RandomResizedCrop crops, then resizes: the filter never reads outside the box."""
    for name in PHOTOS[:2]:
        path = photo(tmp_path, name, (500, 375), fmt)
        ref_img = Image.open(path).convert("RGB")
        for seed in range(4):
            crop = G.crop_box_rrc(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), 224, False,
                                  random.Random(seed))
            x0, y0, x1, y1 = (int(v) for v in crop.box)
            ours = J.load_crop(path, lambda w, h, c=crop: c)
            assert_close(ours, TF.resized_crop(ref_img, y0, x0, y1 - y0, x1 - x0, [224, 224]))


def test_the_old_rounded_box_was_measurably_off(tmp_path):
    """The check above has teeth: rounding the box to whole source pixels (the fast path
    before the fix) misses the bounds on the same photos."""
    path = photo(tmp_path, "astronaut", (500, 375))
    crop = G.crop_box_center(500, 375, 256, 224)
    rounded = G.Crop(tuple(float(round(v)) for v in crop.box), crop.size, False, "box")
    ours = J.load_crop(path, lambda w, h: rounded)
    ref = np.asarray(TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 256), 224),
                     np.float64)
    assert np.abs(ours - ref).mean() > 0.5

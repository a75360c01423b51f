#!/usr/bin/env python
"""Crop fidelity on real photographs: resnet-train's folder crops against torchvision.

scikit-image's colour sample photos, at their own size and resized to ImageNet's usual
shapes, are saved as JPEG (quality 90) and cropped two ways from the same file:

  centre: torchvision Resize(256) + CenterCrop(224)   vs  geometry.crop_box_center
  paper:  Resize(random side in [256, 480]) + crop    vs  geometry.crop_box_paper (same draw)

Prints the mean and max absolute difference in grey levels per photo and overall. The
target (issue 13) is mean <= 0.05 and max <= 2 everywhere. Needs scikit-image ([dev]).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_train.data import geometry as G  # noqa: E402
from resnet_train.data import jpeg as J  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
          "immunohistochemistry"]
SIZES = [None, (500, 375), (375, 500), (640, 480), (333, 500), (256, 300)]


def paper_reference(img, seed: int):
    import torchvision.transforms.functional as TF
    rng = random.Random(seed)  # the draws of crop_box_paper, in its order
    ref = TF.resize(img, rng.randint(256, 480))
    top, left = rng.randint(0, ref.height - 224), rng.randint(0, ref.width - 224)
    return np.asarray(TF.crop(ref, top, left, 224, 224), np.float64)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=5, help="paper-aug draws per image")
    args = p.parse_args()
    import skimage.data
    import torchvision.transforms.functional as TF
    from PIL import Image
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    worst = {"centre": [0.0, 0.0], "paper": [0.0, 0.0]}
    with tempfile.TemporaryDirectory() as tmp:
        for name in PHOTOS:
            base = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            for size in SIZES:
                img = base if size is None else base.resize(size, Image.BICUBIC)
                path = os.path.join(tmp, f"{name}.jpg")
                img.save(path, quality=90)
                ref_img = Image.open(path).convert("RGB")
                ref = np.asarray(TF.center_crop(TF.resize(ref_img, 256), 224), np.float64)
                d = np.abs(J.load_crop(path, lambda w, h: G.crop_box_center(w, h, 256, 224))
                           - ref)
                row = {"centre": (d.mean(), d.max()), "paper": (0.0, 0.0)}
                for seed in range(args.draws):
                    ours = J.load_crop(path, lambda w, h, s=seed: G.crop_box_paper(
                        w, h, (256, 480), 224, False, random.Random(s)))
                    d = np.abs(ours - paper_reference(ref_img, seed))
                    row["paper"] = (max(row["paper"][0], d.mean()), max(row["paper"][1], d.max()))
                for k, (mean, mx) in row.items():
                    worst[k] = [max(worst[k][0], mean), max(worst[k][1], mx)]
                print(f"{name:21s} {str(img.size):11s} centre mean {row['centre'][0]:.3f} "
                      f"max {row['centre'][1]:3.0f} | paper (worst of {args.draws}) mean "
                      f"{row['paper'][0]:.3f} max {row['paper'][1]:3.0f}")
    for k, (mean, mx) in worst.items():
        print(f"worst {k}: mean abs diff {mean:.3f}, max {mx:.0f} grey levels "
              f"(target <= 0.05, <= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

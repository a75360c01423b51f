#!/usr/bin/env python
"""CIFAR-10-format pickles of real photo patches, for measurements that smooth synthetic
images would not show: class k = patches of scikit-image's photo k (10 photos), random
square crops of 40 px to half the photo's short side, resized to 32x32 (bilinear).

  python scripts/photo_cifar.py OUT_DIR [--train 25000] [--test 5000]

then data.dataset=cifar10 data.root=OUT_DIR. Needs scikit-image (the [dev] extra).
"""

from __future__ import annotations

import argparse
import os
import pickle

import numpy as np

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
         "immunohistochemistry", "coins", "camera", "moon"]


def patches(photos, n: int, rng) -> tuple[np.ndarray, list[int]]:
    from PIL import Image
    x, y = np.empty((n, 3072), np.uint8), rng.integers(0, len(photos), n)
    for i in range(n):
        img = photos[y[i]]
        w, h = img.size
        s = int(rng.integers(40, min(w, h) // 2))
        x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        p = np.asarray(img.crop((x0, y0, x0 + s, y0 + s)).resize((32, 32), Image.BILINEAR))
        x[i] = p.transpose(2, 0, 1).reshape(-1)
    return x, y.tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=25000, help="training images (5 batches)")
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import skimage.data
    from PIL import Image
    rng = np.random.default_rng(args.seed)
    photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in NAMES]
    d = os.path.join(args.out, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    per = args.train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", args.test)]:
        x, y = patches(photos, n, rng)
        with open(os.path.join(d, name), "wb") as fh:
            pickle.dump({"data": x, "labels": y, "batch_label": name}, fh, protocol=2)
    with open(os.path.join(d, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": NAMES}, fh, protocol=2)
    print(f"{d}: {per * 5} training and {args.test} test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

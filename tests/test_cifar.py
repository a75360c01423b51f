"""CIFAR-10/100: the pickle reader, splits, device-resident batches, augmentation, errors."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_train.config import load_config
from resnet_train.data import build_data, cifar
from resnet_train.errors import ConfigError, DataError


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the official files: protocol 2, byte strings
    as BINSTRING, numpy arrays via numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                    else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_py2(path, obj):
    with open(path, "wb") as fh:
        Py2Pickler(fh, protocol=2).dump(obj)


def images_for(ids) -> np.ndarray:
    """(N, 3072) uint8 images whose first two pixels encode their id."""
    rng = np.random.default_rng(int(ids[0]) if len(ids) else 0)
    data = rng.integers(0, 256, (len(ids), 3072), dtype=np.uint8)
    data[:, 0], data[:, 1] = np.asarray(ids) % 256, np.asarray(ids) // 256
    return data


def ids_of(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()).tolist()


def make_cifar10(root, per_batch=40, test=30, inside=False):
    d = root if inside else os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    labels = {}
    for b in range(5):
        ids = np.arange(b * per_batch, (b + 1) * per_batch)
        lab = (ids * 7) % 10
        labels.update(zip(ids.tolist(), lab.tolist(), strict=True))
        dump_py2(os.path.join(d, f"data_batch_{b + 1}"), {
            b"batch_label": b"training batch %d of 5" % (b + 1), b"labels": lab.tolist(),
            b"data": images_for(ids), b"filenames": [b"f%d.png" % i for i in ids]})
    ids = np.arange(1000, 1000 + test)
    dump_py2(os.path.join(d, "test_batch"), {b"batch_label": b"testing batch 1 of 1",
                                              b"labels": (ids % 10).tolist(),
                                              b"data": images_for(ids)})
    dump_py2(os.path.join(d, "batches.meta"), {
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                         b"frog", b"horse", b"ship", b"truck"], b"num_vis": 3072})
    return d, labels


def make_cifar100(root, n=60, test=20, inside=False):
    d = root if inside else os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    ids = np.arange(n)
    dump_py2(os.path.join(d, "train"), {b"data": images_for(ids),
                                        b"fine_labels": (ids % 100).tolist(),
                                        b"coarse_labels": (ids % 20).tolist()})
    ids = np.arange(1000, 1000 + test)
    dump_py2(os.path.join(d, "test"), {b"data": images_for(ids),
                                       b"fine_labels": (ids % 100).tolist(),
                                       b"coarse_labels": (ids % 20).tolist()})
    dump_py2(os.path.join(d, "meta"), {b"fine_label_names": [b"c%d" % i for i in range(100)],
                                       b"coarse_label_names": [b"s%d" % i for i in range(20)]})
    return d


def cfg(root, dataset="cifar10", seed=1, **data):
    d = {"dataset": dataset, "root": str(root), "batch_size": 16, "train": {"aug": "none"}}
    for k, v in data.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(data={"run": {"seed": seed}, "data": d})


def build(c, rank=0, world=1):
    return build_data(c, torch.device("cpu"), rank, world)


def test_py2_format_is_what_torchvision_reads(tmp_path):
    d, _ = make_cifar10(str(tmp_path))
    with open(os.path.join(d, "data_batch_1"), "rb") as fh:
        raw = fh.read()
    assert raw.startswith(b"\x80\x02") and b"numpy.core.multiarray\n_reconstruct" in raw
    with open(os.path.join(d, "data_batch_1"), "rb") as fh:
        latin = pickle.load(fh, encoding="latin1")  # torchvision's way: str keys
    assert set(latin) >= {"data", "labels"}


@pytest.mark.parametrize("inside", [False, True])
def test_cifar10_reader_both_root_forms(tmp_path, inside):
    d, labels = make_cifar10(str(tmp_path), inside=inside)
    b = build(cfg(tmp_path))
    assert b.num_classes == 10 and b.info["classes"][0] == "airplane"
    assert b.train.num_samples == 200 and len(b.train) == 12 and b.val.num_samples == 30
    seen = []
    for x, y in b.train.batches(0):
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8
        assert y.tolist() == [labels[i] for i in ids_of(x)]
        seen += ids_of(x)
    assert len(seen) == len(set(seen)) == 192  # exact epoch, tail of 8 dropped
    val = [(x, y) for x, y in b.val.batches(0)]
    assert [x.shape[0] for x, _ in val] == [16, 14]
    vx = torch.cat([x for x, _ in val])
    assert ids_of(vx) == list(range(1000, 1030)) and torch.cat([y for _, y in val]).tolist() == [
        i % 10 for i in range(1000, 1030)]
    expect = torch.from_numpy(images_for(np.arange(1000, 1030)).reshape(-1, 3, 32, 32))
    assert torch.equal(vx, expect)  # the (N, 3072) rows are R, G, B planes


@pytest.mark.parametrize("inside", [False, True])
def test_cifar100_fine_and_coarse(tmp_path, inside):
    make_cifar100(str(tmp_path), inside=inside)
    fine = build(cfg(tmp_path, "cifar100"))
    assert fine.num_classes == 100 and fine.info["classes"][5] == "c5"
    x, y = next(iter(fine.train.batches(0)))
    assert y.tolist() == [i % 100 for i in ids_of(x)]
    coarse = build(cfg(tmp_path, "cifar100", cifar100_labels="coarse"))
    assert coarse.num_classes == 20 and coarse.info["classes"][3] == "s3"
    x, y = next(iter(coarse.train.batches(0)))
    assert y.tolist() == [i % 20 for i in ids_of(x)]
    with pytest.raises(ConfigError, match="data.num_classes"):
        build(cfg(tmp_path, "cifar100", num_classes=10))


def test_holdout_split_sizes_and_disjointness(tmp_path):
    make_cifar10(str(tmp_path))
    b = build(cfg(tmp_path, val_split="holdout", holdout_size=50))
    assert b.train.num_samples == 150 and b.val.num_samples == 50
    train_ids = set(ids_of(b.train.images))
    val_ids = [i for x, _ in b.val.batches(0) for i in ids_of(x)]
    assert len(val_ids) == len(set(val_ids)) == 50
    assert not train_ids & set(val_ids) and train_ids | set(val_ids) == set(range(200))
    again = build(cfg(tmp_path, val_split="holdout", holdout_size=50, seed=99))
    assert set(ids_of(again.train.images)) == train_ids  # fixed by holdout_seed, not run.seed
    other = build(cfg(tmp_path, val_split="holdout", holdout_size=50, holdout_seed=1))
    assert set(ids_of(other.train.images)) != train_ids
    with pytest.raises(ConfigError, match="holdout_size"):
        build(cfg(tmp_path, val_split="holdout", holdout_size=200))


def test_augmented_batches_are_pad_crop_flips_of_the_images(tmp_path):
    make_cifar10(str(tmp_path))
    b = build(cfg(tmp_path, train={"aug": "cifar"}))
    plain = build(cfg(tmp_path))
    flips, shifts = 0, set()
    for (x, y), (x0, y0) in zip(b.train.batches(0), plain.train.batches(0), strict=True):
        assert torch.equal(y, y0)  # same images, same order
        for a, src in zip(x, x0, strict=True):
            # every 32x32 window of the zero-padded source: (3, 9, 9, 32, 32)
            windows = F.pad(src, (4, 4, 4, 4)).unfold(1, 32, 1).unfold(2, 32, 1)
            matches = [(int(oy), int(ox), f) for f in (False, True) for oy, ox in
                       (windows == (a.flip(-1) if f else a)[:, None, None]).all(-1).all(-1).all(0)
                       .nonzero().tolist()]
            assert matches, "not a 4-pixel pad-crop(-flip) of its source image"
            flips += matches[0][2]
            shifts.add(matches[0][:2])
    assert 60 < flips < 132 and len(shifts) > 40  # of 192: both flips, many offsets
    again = build(cfg(tmp_path, train={"aug": "cifar"}))
    assert all(torch.equal(p[0], q[0])
               for p, q in zip(b.train.batches(3), again.train.batches(3), strict=True))
    paper = build(cfg(tmp_path, train={"aug": "paper"}))  # paper = the CIFAR recipe here
    assert all(torch.equal(p[0], q[0])
               for p, q in zip(b.train.batches(1), paper.train.batches(1), strict=True))


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_ranks_concatenate_to_the_single_process_batch(tmp_path, world):
    make_cifar10(str(tmp_path))
    c = cfg(tmp_path, train={"aug": "cifar"})
    single = list(build(c).train.batches(2))
    ranks = [build(c, r, world) for r in range(world)]
    per_rank = [list(r.train.batches(2)) for r in ranks]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([p[step][0] for p in per_rank]), x)  # augmentation too
        assert torch.equal(torch.cat([p[step][1] for p in per_rank]), y)
    val = [i for r in ranks for x, _ in r.val.batches(0) for i in ids_of(x)]
    assert val == list(range(1000, 1030))  # every test image exactly once


def test_mid_epoch_start_is_the_tail(tmp_path):
    make_cifar10(str(tmp_path))
    b = build(cfg(tmp_path, train={"aug": "cifar"}))
    full = list(b.train.batches(5))
    tail = list(b.train.batches(5, start=9))
    assert len(tail) == 3
    assert all(torch.equal(a[0], t[0]) and torch.equal(a[1], t[1])
               for a, t in zip(full[9:], tail, strict=True))


def test_pixel_mean_and_channel_normalisation(tmp_path):
    make_cifar10(str(tmp_path))
    b = build(cfg(tmp_path, normalize="pixel_mean", divide_std=False))
    train = torch.from_numpy(images_for(np.arange(0, 40)).reshape(-1, 3, 32, 32))
    all_train = torch.cat([torch.from_numpy(images_for(np.arange(k * 40, (k + 1) * 40))
                                            .reshape(-1, 3, 32, 32)) for k in range(5)])
    mean = all_train.double().mean(0) / 255
    out = b.val_prep(train[:4])
    torch.testing.assert_close(out, (train[:4].double() / 255 - mean).float(), atol=1e-5, rtol=0)
    c = build(cfg(tmp_path))
    out = c.val_prep(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))[0, :, 0, 0]
    ref = (1 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(out, ref)


def test_malformed_files_are_data_errors_naming_the_file(tmp_path):
    d, _ = make_cifar10(str(tmp_path))
    b3 = os.path.join(d, "data_batch_3")
    cases = [
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, "shape"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, "uint8"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, "4 images but 3 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
         r"labels must be in \[0, 10\)"),
        ({b"labels": [0]}, "missing key 'data'"),
    ]
    for obj, msg in cases:
        dump_py2(b3, obj)
        with pytest.raises(DataError, match=msg) as err:
            build(cfg(tmp_path))
        assert b3 in str(err.value)
    with open(b3, "wb") as fh:
        fh.write(b"not a pickle at all")
    with pytest.raises(DataError, match="data_batch_3: not a CIFAR python pickle"):
        build(cfg(tmp_path))
    os.remove(b3)
    with pytest.raises(DataError, match="data_batch_3: CIFAR file not found"):
        build(cfg(tmp_path))


def test_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    d, _ = make_cifar10(str(tmp_path))
    with open(os.path.join(d, "test_batch"), "wb") as fh:
        pickle.dump({"data": Evil(), "labels": []}, fh)
    with pytest.raises(DataError, match="refusing to load global"):
        build(cfg(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_missing_files_and_offline_download(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no CIFAR10 files.*data.download=true"):
        build(cfg(tmp_path))
    calls = []

    def offline(url, download_root, md5=None, **kw):
        calls.append((url, download_root, md5))
        raise OSError("network is unreachable")

    import torchvision.datasets.utils as tvu
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="data.download: could not fetch .*cifar-10-python.tar.gz"):
        build(cfg(tmp_path, download=True))
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", str(tmp_path),
                      "c58f30108f718f92721af3b95e74349a")]


def test_converted_files_with_str_keys_and_4d_arrays(tmp_path):
    """A subset re-saved by Python 3 (str keys, (N, 3, 32, 32) array) reads the same."""
    d, _ = make_cifar10(str(tmp_path))
    imgs = images_for(np.arange(500, 512)).reshape(-1, 3, 32, 32)
    with open(os.path.join(d, "data_batch_2"), "wb") as fh:
        pickle.dump({"data": imgs, "labels": np.arange(12) % 10}, fh, protocol=5)
    x, y = cifar.read_batch(os.path.join(d, "data_batch_2"), "labels", 10)
    assert np.array_equal(x, imgs) and y.tolist() == [i % 10 for i in range(12)]
    b = build(cfg(tmp_path))
    assert b.train.num_samples == 172
    assert set(range(500, 512)) <= set(ids_of(b.train.images))

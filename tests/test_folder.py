"""Image-folder datasets: labels, order, sharding, resume, bad data, protocols, val script."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_train.config import load_config
from resnet_train.data import build_data, folder
from resnet_train.data.sampling import batch_generator, epoch_permutation, train_batch_indices
from resnet_train.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, H = 40, 30  # tiny images; train scale [32, 48], crop 32; val resize 36, crop 32


def colour(index: int, label: int) -> tuple[int, int, int]:
    """A solid colour that encodes (index, label) robustly to resampling and JPEG."""
    return (index % 16) * 16 + 8, (index // 16) * 16 + 8, 40 + 60 * label


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    """(index, label) of each solid-colour image of a uint8 batch."""
    m = x.float().mean(dim=(-1, -2)).round().long()
    return [(int(r) // 16 + 16 * (int(g) // 16), (int(b) - 40 + 30) // 60)
            for r, g, b in m.tolist()]


def make_split(root, split, counts: dict[str, int], start=0, fmt="PNG"):
    """Solid images root/split/<class>/img_<i>: image i is the i-th in sorted order."""
    i = start
    for label, cls in enumerate(sorted(counts)):
        d = os.path.join(root, split, cls)
        os.makedirs(d, exist_ok=True)
        for _ in range(counts[cls]):
            Image.new("RGB", (W, H), colour(i, label)).save(
                os.path.join(d, f"img_{i:03d}.{fmt.lower()}"), fmt)
            i += 1
    return i


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "data")
    end = make_split(root, "train", {"zebra": 8, "ant": 8, "moth": 8})  # 24 images, unsorted names
    make_split(root, "val", {"zebra": 3, "ant": 2, "moth": 2}, start=end)
    return root


def cfg(root, seed=7, **data):
    d = {"dataset": "folder", "root": root, "batch_size": 8, "workers": 0,
         "train": {"scale": [32, 48], "crop": 32}, "val": {"resize": 36, "crop": 32}}
    for k, v in data.items():
        if isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return load_config(data={"run": {"seed": seed}, "data": d})


def build(c, rank=0, world=1, run_dir=None):
    return build_data(c, torch.device("cpu"), rank, world, run_dir)


def epoch(loader, e=0, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.batches(e, start)]


# --------------------------------------------------------------------------- labels and order


def test_classes_sorted_labels_match_folders(tree):
    b = build(cfg(tree))
    assert b.num_classes == 3 and b.info["classes"] == ["ant", "moth", "zebra"]
    assert b.train.num_samples == 24 and len(b.train) == 3
    seen = []
    for x, y in b.train.batches(0):
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
        ids = decode(x)
        assert [lab for _, lab in ids] == y.tolist()  # label = sorted-folder index
        seen += [i for i, _ in ids]
    assert sorted(seen) == list(range(24))  # each image exactly once per epoch
    val = epoch(b.val)
    assert [x.shape[0] for x, _ in val] == [7]
    assert decode(val[0][0]) == list(zip(range(24, 31), val[0][1].tolist(), strict=True))
    assert val[0][1].tolist() == [0, 0, 1, 1, 2, 2, 2]  # in order: ant, moth, zebra


def test_order_follows_the_epoch_permutation_and_is_deterministic(tree):
    c = cfg(tree)
    a, b = build(c), build(c)
    e0, e0_again, e1 = epoch(a.train, 0), epoch(b.train, 0), epoch(a.train, 1)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for (x1, y1), (x2, y2) in zip(e0, e0_again, strict=True))
    # The scanned order is the sorted file order, so image i has index i.
    perm = epoch_permutation(24, 7, 0)
    for step, (x, _) in enumerate(e0):
        assert [i for i, _ in decode(x)] == train_batch_indices(perm, step, 8, 0, 1).tolist()
    assert [i for x, _ in e0 for i, _ in decode(x)] != [i for x, _ in e1 for i, _ in decode(x)]


def test_augmentation_is_deterministic_and_varies(tmp_path):
    root = str(tmp_path / "d")
    os.makedirs(os.path.join(root, "train", "a"))
    os.makedirs(os.path.join(root, "val", "a"))
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            os.path.join(root, "train", "a", f"{i}.png"))
    Image.new("RGB", (W, H)).save(os.path.join(root, "val", "a", "v.png"))
    c = cfg(root)
    x1 = epoch(build(c).train, 3)[0][0]
    x2 = epoch(build(c).train, 3)[0][0]
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, epoch(build(c).train, 4)[0][0])
    assert not torch.equal(x1, epoch(build(cfg(root, seed=8)).train, 3)[0][0])


def test_mid_epoch_start_yields_the_tail_without_decoding_skipped(tree, monkeypatch):
    b = build(cfg(tree))
    full = epoch(b.train, 2)
    calls = []
    real = folder.load_crop
    monkeypatch.setattr(folder, "load_crop", lambda *a: calls.append(a[0]) or real(*a))
    tail = epoch(b.train, 2, start=1)
    assert len(tail) == 2 and len(calls) == 16  # batches 1 and 2 only
    for (x1, y1), (x2, y2) in zip(full[1:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert epoch(b.train, 2, start=3) == []


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_are_the_global_batch(tmp_path, world):
    root = str(tmp_path / "d")
    make_split(root, "train", {"a": 20, "b": 16})  # 36 images
    make_split(root, "val", {"a": 6, "b": 5}, start=36)
    c = cfg(root, batch_size=12, train={"pca_lighting": 0.1, "color_jitter": 0.4})
    one = build(c)
    single = epoch(one.train, 1)
    ranks = [build(c, r, world) for r in range(world)]
    per_rank = [epoch(r.train, 1) for r in ranks]
    assert all(len(p) == len(single) == 3 for p in per_rank)
    for step, (x, y) in enumerate(single):
        xs = torch.cat([p[step][0] for p in per_rank])
        ys = torch.cat([p[step][1] for p in per_rank])
        assert torch.equal(xs, x) and torch.equal(ys, y)  # augmentation included
        # the on-device jitter and lighting too, with the trainer's rank-independent seed
        prepared = [r.train_prep(p[step][0], batch_generator(7, 1, step, 0)).clone()
                    for r, p in zip(ranks, per_rank, strict=True)]
        assert torch.equal(torch.cat(prepared), one.train_prep(x, batch_generator(7, 1, step, 0)))
    # validation: every image once over the ranks, in order, no padding
    val = [i for r in ranks for x, _ in r.val.batches(0) for i, _ in decode(x)]
    assert val == list(range(36, 47))
    assert all(r.val.num_samples == 11 for r in ranks)


# --------------------------------------------------------------------------- errors


def test_num_classes_must_match(tree):
    assert build(cfg(tree, num_classes=3)).num_classes == 3
    with pytest.raises(ConfigError, match="data.num_classes"):
        build(cfg(tree, num_classes=1000, dataset="imagenet"))


def test_empty_class_folder_is_an_error(tree):
    os.makedirs(os.path.join(tree, "train", "empty"))
    with open(os.path.join(tree, "train", "empty", "notes.txt"), "w") as fh:
        fh.write("not an image")
    with pytest.raises(DataError, match=r"train/empty: class folder has no images"):
        build(cfg(tree))


def test_missing_split_and_flat_val_are_errors(tree, tmp_path):
    with pytest.raises(DataError, match=r"data/nope: split directory not found"):
        build(cfg(tree, val_dir="nope"))
    flat = os.path.join(tree, "flatval")
    os.makedirs(flat)
    for k in range(3):
        Image.new("RGB", (W, H)).save(os.path.join(flat, f"ILSVRC2012_val_{k + 1:08d}.JPEG"))
    with pytest.raises(DataError, match="no class folders.*prepare_imagenet_val.py"):
        build(cfg(tree, val_dir="flatval"))
    os.makedirs(os.path.join(tree, "emptyval"))
    with pytest.raises(DataError, match="empty split"):
        build(cfg(tree, val_dir="emptyval"))


def write_bad_files(root):
    """A garbage .jpg, a truncated JPEG and a text file named .png, in class 'ant'."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        good, "JPEG", quality=90)
    d = os.path.join(root, "train", "ant")
    with open(os.path.join(d, "bad_garbage.jpg"), "wb") as fh:
        fh.write(os.urandom(500))
    with open(os.path.join(d, "bad_truncated.jpg"), "wb") as fh:
        fh.write(good.getvalue()[: len(good.getvalue()) // 2])
    with open(os.path.join(d, "bad_text.png"), "w") as fh:
        fh.write("hello")
    return {os.path.join(d, n) for n in ("bad_garbage.jpg", "bad_truncated.jpg", "bad_text.png")}


def test_bad_images_skipped_replaced_and_reported(tree):
    bad = write_bad_files(tree)  # 27 images: batch 9 reads all of them
    c = cfg(tree, batch_size=9)
    b = build(c)
    run1 = epoch(b.train, 0)
    count, paths = b.train.bad_report()
    assert count == 3 and set(paths) == bad
    assert b.train.bad_report() == (0, [])  # since the last call
    assert all(x.shape[0] == 9 for x, _ in run1)
    ids = [i for x, _ in run1 for i, _ in decode(x)]
    labels = [lab for x, y in run1 for lab in y.tolist()]
    # replacements carry their label
    assert [lab for x, _ in run1 for _, lab in decode(x)] == labels
    assert len(ids) == 27 and set(ids) <= set(range(24))
    run2 = epoch(build(c).train, 0)  # replacements are deterministic
    assert all(torch.equal(a[0], b_[0]) for a, b_ in zip(run1, run2, strict=True))


def test_bad_image_error_names_the_path_in_process_and_from_workers(tree):
    bad = write_bad_files(tree)
    for workers in (0, 2):
        b = build(cfg(tree, batch_size=9, workers=workers, on_bad_image="error"))
        with pytest.raises(DataError) as err:
            epoch(b.train, 0)
        msg = str(err.value)
        assert any(p in msg for p in bad) and "unreadable image" in msg
        b.train.close()


def test_12bit_jpeg_reports_its_precision_not_cannot_identify(tree):
    buf = io.BytesIO()
    Image.new("RGB", (W, H), (90, 20, 200)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")  # SOF0: marker, 2-byte length, then the precision byte
    assert sof > 0 and data[sof + 4] == 8
    data[sof + 4] = 12
    path = os.path.join(tree, "train", "ant", "deep.jpg")
    with open(path, "wb") as fh:
        fh.write(data)
    b = build(cfg(tree, batch_size=25, on_bad_image="error"))  # 25 images: one batch reads all
    with pytest.raises(DataError) as err:
        epoch(b.train, 0)
    msg = str(err.value)
    assert path in msg and "unsupported JPEG data precision 12" in msg
    assert "cannot identify" not in msg
    b = build(cfg(tree, batch_size=25))  # skip: replaced, counted and named
    assert [x.shape[0] for x, _ in epoch(b.train, 0)] == [25]
    assert b.train.bad_report() == (1, [path])


def test_images_beside_class_folders_are_ignored_with_one_warning(tree, capfd):
    val = os.path.join(tree, "val")
    for k in range(3):  # what an interrupted prepare_imagenet_val.py --apply leaves
        Image.new("RGB", (W, H)).save(os.path.join(val, f"ILSVRC2012_val_{k + 1:08d}.JPEG"))
    with open(os.path.join(val, "notes.txt"), "w") as fh:  # not an image: not counted
        fh.write("x")
    Image.new("RGB", (W, H)).save(os.path.join(val, ".hidden.png"))
    capfd.readouterr()
    b = build(cfg(tree))
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines == [f"warning: {val} holds 3 image files outside class folders (ignored); an "
                     f"interrupted scripts/prepare_imagenet_val.py --apply leaves this: "
                     f"run it again"]
    assert b.info["val_samples"] == 7  # the class folders' images only
    build(cfg(tree), rank=1, world=2)  # rank 0 speaks
    assert capfd.readouterr() == ("", "")


def test_workers_give_the_same_batches_as_in_process(tree):
    c0 = cfg(tree, workers=0)
    c2 = cfg(tree, workers=2)
    a, b = build(c0), build(c2)
    try:
        for e in (0, 1):  # persistent workers across epochs
            ea, eb = epoch(a.train, e), epoch(b.train, e, 0)
            assert len(ea) == len(eb) == 3
            assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
                       for (x1, y1), (x2, y2) in zip(ea, eb, strict=True))
        assert torch.equal(epoch(b.train, 1, start=2)[0][0], epoch(a.train, 1)[2][0])
    finally:
        b.train.close()
        b.val.close()


def test_workers_decode_partial_jpegs_bit_identical_to_in_process(tmp_path, monkeypatch, capfd):
    """Photo-like JPEGs big enough for the crop box to end well above the bottom: workers
    decode shortened frames (silently), the main process whole ones; batches are equal."""
    root = str(tmp_path / "jpegs")
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("val", 3)):
        for i in range(n):
            d = os.path.join(root, split, f"c{i % 3}")
            os.makedirs(d, exist_ok=True)
            arr = rng.integers(0, 256, (180, 240, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(d, f"i{i:02d}.jpg"), quality=85)
    log = tmp_path / "heights.txt"
    from resnet_train.data import jpeg as J
    real = J._jpeg_decoder()

    def recording(buf):
        with open(log, "a") as fh:  # appended from the worker processes
            fh.write(f"{int.from_bytes(buf[J._jpeg_sof(buf)[2]:J._jpeg_sof(buf)[2] + 2], 'big')}\n")
        return real(buf)
    monkeypatch.setattr(J, "_jpeg_decoder", lambda: recording)
    c0 = cfg(root, batch_size=6, workers=0, train={"scale": [256, 320], "crop": 96})
    c2 = cfg(root, batch_size=6, workers=2, train={"scale": [256, 320], "crop": 96})
    a = epoch(build(c0).train, 0)
    assert set(log.read_text().split()) == {"180"}  # in process: whole frames
    log.write_text("")
    b = build(c2)
    try:
        got = epoch(b.train, 0)
    finally:
        b.train.close()
        b.val.close()
    heights = [int(v) for v in log.read_text().split()]
    assert len(heights) == 12 and min(heights) < 180  # workers shortened frames
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for (x1, y1), (x2, y2) in zip(a, got, strict=True))
    assert "Corrupt JPEG" not in capfd.readouterr().err


# --------------------------------------------------------------------------- batch ring


def test_batch_ring_lends_a_slot_only_when_nothing_can_still_use_it():
    from resnet_train.data.ring import BatchRing, RingSlot
    ring = BatchRing(2, batch=4, sample_shape=(2, 2, 3))
    ring.new_pass()
    a, b = ring.take(4), ring.take(3)
    assert {a, b} == {0, 1} and ring.take(4) is None  # both in flight: the key goes fresh
    ring.memory[a].fill_(7)
    x = ring.deliver(RingSlot(a, 4))
    assert x.shape == (4, 2, 2, 3) and int(x.sum()) == 7 * 48
    view = x.permute(0, 3, 1, 2)[1:]
    del x
    assert ring.take(4) is None  # a view of the delivered batch is alive
    arr = view.numpy()
    del view
    assert ring.take(4) is None  # so is a numpy array over it
    del arr
    assert ring.take(4) == a and ring.hits == 1  # the last reference gone: reused
    y = ring.deliver(RingSlot(a, 4))
    with pytest.raises(RuntimeError, match="slot 0 delivered but not lent out"):
        ring.deliver(RingSlot(a, 4))  # twice: a protocol error, never a silent alias
    assert ring.take(5) is None  # larger than a slot
    ring.new_pass()  # b's task (never delivered) belongs to the last pass: free once reset
    assert ring.take(1) is None
    ring.drop_stale()
    assert ring.take(1) == b and ring.take(1) is None  # y still holds a
    del y
    assert ring.take(1) == a
    big = BatchRing.for_loader(16, 4, 256, (224, 224, 3))  # 67 wanted, capped at 1 GiB
    assert len(big._free) == (1 << 30) // (256 * 224 * 224 * 3) == 27
    assert BatchRing.for_loader(0, 4, 8, (32, 32, 3)) is None  # no workers: no shared memory


def test_ring_batches_equal_in_process_and_a_kept_batch_is_never_overwritten(tree):
    """The training loader decodes into reused shared buffers: every batch equals the
    in-process one, whether the consumer drops each batch (all from the ring), keeps them
    all (the ring runs dry: fresh segments, the kept ones intact) or leaves a pass midway."""
    a = build(cfg(tree, workers=0, batch_size=2))
    b = build(cfg(tree, workers=2, prefetch=1, batch_size=2))
    ring = b.train._ring
    try:
        assert ring is not None and b.val._ring is None and a.train._ring is None
        slots = len(ring._free)
        assert slots == 2 * 1 + 3
        want = {e: epoch(a.train, e) for e in (0, 1)}

        def equal(got, e):
            return len(got) == 12 and all(
                torch.equal(x1, x2) and torch.equal(y1, y2)
                for (x1, y1), (x2, y2) in zip(got, want[e], strict=True))
        assert equal(epoch(b.train, 0), 0) and ring.hits == 12  # cloned, dropped: all reused
        kept = list(b.train.batches(1))  # held, not cloned
        assert equal(kept, 1) and ring.hits - 12 <= slots  # the rest came fresh
        del kept
        hits = ring.hits
        it = b.train.batches(0)
        first = [next(it) for _ in range(3)]
        it.close()  # left midway: tasks in flight and results never delivered
        # the slots of the tasks left in flight are lent again (3 stay with ``first``)
        assert equal(epoch(b.train, 0), 0) and ring.hits - hits > 3
        assert all(torch.equal(x, w[0]) for (x, _), w in zip(first, want[0], strict=False))
        assert not ring._assigned and len(ring._free) + len(ring._delivered) == slots
        b.train.close()  # workers stopped (maybe only signalled): no slot is lent again
        hits = ring.hits
        assert b.train._ring is None and b.train.decoder.ring is None  # memory released
        assert equal(epoch(b.train, 1), 1) and ring.hits == hits
    finally:
        b.train.close()
        b.val.close()


def test_no_ring_for_device_decode_or_pinned_batches():
    dec = folder.BatchDecoder(np.array([b"x"]), np.zeros(1, dtype=np.int64),
                              ("paper", (32, 48), 32, True), 0, encoded=True)
    loader = folder.FolderLoader(dec, None, 1, 1, 2, False, 1, 0, ring_batch=8)
    assert loader._ring is None and dec.ring is None
    dec = folder.BatchDecoder(np.array([b"x"]), np.zeros(1, dtype=np.int64),
                              ("paper", (32, 48), 32, True), 0)
    assert folder.FolderLoader(dec, None, 1, 1, 2, True, 1, 0, ring_batch=8)._ring is None
    loader = folder.FolderLoader(dec, None, 1, 1, 2, False, 1, 0, ring_batch=8)
    assert loader._ring.memory.shape == (5, 8, 32, 32, 3) and dec.ring is loader._ring.memory


# --------------------------------------------------------------------------- normalisation


def test_pixel_mean_is_computed_once_and_cached(tree, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    c = cfg(tree, normalize="pixel_mean", divide_std=False)
    b = build(c, run_dir=run_dir)
    cached = [f for f in os.listdir(run_dir) if f.startswith("pixel_mean_")]
    assert len(cached) == 1
    # Solid images: the mean image is the mean colour of the 24 training images.
    labels = [0] * 8 + [1] * 8 + [2] * 8
    expect = torch.tensor([colour(i, lab) for i, lab in enumerate(labels)],
                          dtype=torch.float64).mean(0) / 255
    mean_img = b.train_prep.mean[0]
    assert mean_img.shape == (3, 32, 32)
    torch.testing.assert_close(mean_img.mean(dim=(1, 2)).double(), expect, atol=2e-3, rtol=0)
    monkeypatch.setattr(folder, "pixel_mean_image",
                        lambda *a, **k: pytest.fail("recomputed despite the cache"))
    again = build(c, run_dir=run_dir)
    assert torch.equal(again.train_prep.mean, b.train_prep.mean)
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    torch.testing.assert_close(again.val_prep(x), x.float() / 255 - mean_img)


def test_channel_normalisation_defaults_to_imagenet(tree):
    b = build(cfg(tree))
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = b.val_prep(x)[0, :, 0, 0]
    ref = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- eval protocols


def test_val_protocols(tree):
    b = build(cfg(tree, batch_size=20, val={"protocol": "ten_crop"}))
    batches = epoch(b.val)
    assert [x.shape for x, _ in batches] == [(2, 10, 3, 32, 32)] * 3 + [(1, 10, 3, 32, 32)]
    ids = [decode(x[:, k]) for x, _ in batches for k in range(10)]
    assert all(len(set(v)) == 1 for v in zip(*ids[:10], strict=True))  # 10 views of the same image
    assert [i for x, _ in batches for i, _ in decode(x[:, 0])] == list(range(24, 31))
    assert sum(len(y) for _, y in batches) == 7
    prepared = b.val_prep(batches[0][0])  # prep accepts the 5-D batch
    assert prepared.shape == (2, 10, 3, 32, 32) and prepared.dtype == torch.float32
    m = build(cfg(tree, val={"protocol": "multiscale", "scales": [32, 40]}))
    xs = epoch(m.val)  # a scale above the image's own: loaded as it is, enlarged on the device
    assert len(xs) == 7 and all(x.shape == (1, 3, H, W) for x, _ in xs)
    m = build(cfg(tree, val={"protocol": "multiscale", "scales": [16, 20]}))
    xs = epoch(m.val)  # all scales below: loaded at the largest one
    assert len(xs) == 7 and all(x.shape == (1, 3, 20, int(20 * W / H)) for x, _ in xs)


# --------------------------------------------------------------------------- prepare script


def run_prepare(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "prepare_imagenet_val.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=60)


def test_prepare_imagenet_val_dry_run_apply_rerun(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    ids = [3, 1, 1, 2, 3]
    for k in range(1, 6):
        Image.new("RGB", (8, 8)).save(val / f"ILSVRC2012_val_{k:08d}.JPEG")
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{i}\n" for i in ids))
    syn = tmp_path / "synsets.txt"
    syn.write_text("n02119789 kit fox\nn01440764 tench\nn09999999 last\n")
    before = sorted(os.listdir(val))
    r = run_prepare(val, "--ground-truth", gt, "--synsets", syn)
    assert r.returncode == 0 and "would move 5 images into 3 class folders" in r.stdout
    assert sorted(os.listdir(val)) == before  # dry run moved nothing
    r = run_prepare(val, "--ground-truth", gt, "--synsets", syn, "--apply")
    assert r.returncode == 0 and "moved 5 images" in r.stdout
    wnids = ["n02119789", "n01440764", "n09999999"]
    for k, i in enumerate(ids, start=1):
        assert (val / wnids[i - 1] / f"ILSVRC2012_val_{k:08d}.JPEG").is_file()
    assert sorted(os.listdir(val)) == sorted(wnids)
    r = run_prepare(val, "--ground-truth", gt, "--synsets", syn, "--apply")
    assert r.returncode == 0 and "moved 0 images" in r.stdout and "5 already in place" in r.stdout
    classes, paths, labels = folder.scan_split(str(tmp_path), "val")
    assert classes == sorted(wnids) and len(paths) == 5


def test_prepare_imagenet_val_from_csv_and_bad_args(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(val / f"{name}.JPEG")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\na,n1 1 2 3 4\nb,n2 5 6 7 8 n2 1 1 2 2\n")
    r = run_prepare(val, "--csv", csv, "--apply")
    assert r.returncode == 0, r.stderr
    assert (val / "n1" / "a.JPEG").is_file() and (val / "n2" / "b.JPEG").is_file()
    assert (val / "c.JPEG").is_file() and "1 images not in the labels" in r.stdout
    r = run_prepare(val)
    assert r.returncode == 2 and "give --devkit" in r.stderr
    r = run_prepare(tmp_path / "missing", "--csv", csv)
    assert r.returncode == 2 and "directory not found" in r.stderr

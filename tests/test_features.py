"""Features that had no test that fails when they break: label smoothing, the synthetic
ImageNet dataset, loader prefetch and pinned memory, the progress bar, and global torch flags
that a run must not leak."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import resnet_train.models as models
from resnet_train.cli import train as train_cli
from resnet_train.config import load_config
from resnet_train.data import build_data

from .helpers import tiny

CPU = torch.device("cpu")


def metrics(run_dir, kind="epoch"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r.get("kind") == kind]


def capture_models(monkeypatch) -> list:
    """Make the trainer's ``build_model`` hand back the models it builds (the trainer
    imports it from ``resnet_train.models`` when it runs)."""
    real, built = models.build_model, []

    def build_model(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(models, "build_model", build_model)
    return built


# --------------------------------------------------------------------------- label smoothing


def record_cross_entropy(monkeypatch) -> list[dict]:
    """Every ``F.cross_entropy`` call (the engine's training loss): its label_smoothing,
    inputs and result, and whether it ran under inference mode (evaluation)."""
    real, calls = F.cross_entropy, []

    def cross_entropy(logits, target, *args, **kwargs):
        out = real(logits, target, *args, **kwargs)
        calls.append({"smoothing": kwargs.get("label_smoothing", 0.0),
                      "reduction": kwargs.get("reduction", "mean"),
                      "logits": logits.detach().float().clone(), "target": target.clone(),
                      "loss": float(out.detach()),
                      "inference": torch.is_inference_mode_enabled()})
        return out

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    return calls


def smoothed_ce(logits: torch.Tensor, target: torch.Tensor, eps: float) -> float:
    """Label-smoothed cross-entropy written out: (1-eps) * NLL + eps * mean over classes."""
    logp = logits.log_softmax(1)
    nll = -logp.gather(1, target.unsqueeze(1)).squeeze(1)
    return float(((1 - eps) * nll - eps * logp.mean(1)).mean())


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_label_smoothing_is_the_objective_and_the_logged_losses_are_plain(tmp_path,
                                                                         monkeypatch, eps):
    """The smoothed cross-entropy is what the steps minimise; train_loss, like val_loss, is
    the plain cross-entropy (comparable curves; the smoothed one's floor is far above 0)."""
    built = capture_models(monkeypatch)
    calls = record_cross_entropy(monkeypatch)
    run_dir = str(tmp_path / "ls")
    extra = [f"train.label_smoothing={eps}"] if eps else []  # 0.0: the key left unset
    # run.device=cpu: the trained model is scored again below on the CPU-built data
    args = tiny(run_dir, "train.epochs=1", "run.device=cpu", *extra)
    assert train_cli.main(args) == 0

    train_calls = [c for c in calls if not c["inference"] and c["reduction"] == "mean"]
    assert len(train_calls) == 256 // 32  # one objective per step (accum_steps=1)
    assert [c["smoothing"] for c in train_calls] == [eps] * len(train_calls)
    assert all(c["smoothing"] == 0.0 for c in calls if c["reduction"] != "mean")
    for c in train_calls:  # the objective is the smoothed loss of those logits...
        assert c["loss"] == pytest.approx(smoothed_ce(c["logits"], c["target"], eps), abs=1e-5)
    # ...and the epoch's train_loss the plain one's mean (all batches have 32 images)
    plain_train = [smoothed_ce(c["logits"], c["target"], 0.0) for c in train_calls]
    (rec,) = metrics(run_dir)
    assert rec["train_loss"] == pytest.approx(sum(plain_train) / len(plain_train), abs=1e-5)
    if eps:
        assert abs(sum(plain_train) - sum(c["loss"] for c in train_calls)) / 8 > 2e-3

    # val_loss is the plain cross-entropy of the trained model on the validation split
    model = built[0].eval()
    data = build_data(load_config(None, args), CPU)
    with torch.no_grad():
        logits = torch.cat([model(data.val_prep(x)) for x, _ in data.val.batches(0, 0)])
    labels = torch.cat([y for _, y in data.val.batches(0, 0)])
    plain = float(F.nll_loss(logits.log_softmax(1), labels))
    assert rec["val_loss"] == pytest.approx(plain, abs=1e-4)
    if eps:  # the two differ by far more than the tolerance above: the check tells them apart
        assert abs(smoothed_ce(logits, labels, eps) - plain) > 2e-3


# --------------------------------------------------------------------------- synthetic_imagenet


def imagenet_cfg(*extra):
    return load_config(None, ["data.dataset=synthetic_imagenet", "data.train.crop=32",
                              "data.train_samples=70", "data.val_samples=20",
                              "data.batch_size=16", "run.seed=5", *extra])


def test_synthetic_imagenet_batches(tmp_path):
    assert build_data(imagenet_cfg(), CPU).num_classes == 1000  # ImageNet's by default
    b = build_data(imagenet_cfg("data.num_classes=10"), CPU)
    assert b.num_classes == 10
    assert len(b.train) == 70 // 16 == 4  # full batches only
    e0, e1 = list(b.train.batches(0)), list(b.train.batches(1))
    assert len(e0) == len(e1) == 4
    for x, y in e0 + e1:
        assert x.dtype == torch.uint8 and x.shape == (16, 3, 32, 32)  # NCHW, data.train.crop
        assert y.dtype == torch.int64 and y.shape == (16,)
        assert 0 <= int(y.min()) and int(y.max()) < 10
    allx = torch.cat([x for x, _ in e0]).float()
    assert 0 <= allx.min() < 5 and 250 < allx.max() <= 255  # noise over the uint8 range
    assert len({int(v) for _, y in e0 for v in y}) > 5  # labels spread over the classes
    # a batch is a pure function of (seed, epoch, step): fresh each epoch and step ...
    assert not torch.equal(e0[0][0], e1[0][0]) and not torch.equal(e0[0][0], e0[1][0])
    assert not torch.equal(e0[0][1], e1[0][1])
    # ... repeated exactly, from any start (mid-epoch resume) and by a fresh build
    tail = list(b.train.batches(1, 2))
    assert len(tail) == 2
    for (x, y), (xt, yt) in zip(e1[2:], tail, strict=True):
        assert torch.equal(x, xt) and torch.equal(y, yt)
    again = list(build_data(imagenet_cfg("data.num_classes=10"), CPU).train.batches(1))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(e1, again, strict=True))
    other = next(build_data(imagenet_cfg("data.num_classes=10", "run.seed=6"), CPU)
                 .train.batches(1))
    assert not torch.equal(other[0], e1[0][0])  # run.seed drives it

    # the validation split: every image once, fixed, in batches of data.batch_size
    assert len(b.val) == 2 and b.val.num_samples == 20
    v1, v2 = list(b.val.batches(0)), list(b.val.batches(3))
    assert [x.shape[0] for x, _ in v1] == [16, 4]
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) for x, _ in v1)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(v1, v2, strict=True))
    # uint8 until the device: the prep makes normalised float32 of the same shape
    x = b.train_prep(e0[0][0], None)
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32)
    assert abs(float(x.mean())) < 0.5  # (u/255 - ImageNet mean) / std of uniform noise


def test_synthetic_imagenet_trains_end_to_end(tmp_path, capsys, monkeypatch):
    real, shapes = models.build_model, set()

    def build_model(*args, **kwargs):  # the shapes of the batches the model is given
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda m, inputs: shapes.add(
            (m.training, tuple(inputs[0].shape), inputs[0].dtype)))
        return model

    monkeypatch.setattr(models, "build_model", build_model)
    run_dir = str(tmp_path / "sin")
    assert train_cli.main(tiny(run_dir, "data.dataset=synthetic_imagenet", "model.arch=resnet18",
                               "model.width=4", "data.train.crop=32", "data.num_classes=10",
                               "data.train_samples=64", "data.val_samples=24",
                               "data.batch_size=16", "train.epochs=1")) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "on 64 images, 10 classes" in out
    (rec,) = metrics(run_dir)
    assert rec["global_step"] == 4 and rec["val_n"] == 24
    # data.train.crop (not data.image_size=16 of tiny()) sets the size; prepared to float32
    assert shapes == {(True, (16, 3, 32, 32), torch.float32),
                      (False, (16, 3, 32, 32), torch.float32),
                      (False, (8, 3, 32, 32), torch.float32)}
    # noise labels: nothing to learn; the loss starts near log(10), the chance level, and
    # the validation images (other noise) cannot be predicted better than chance
    assert abs(rec["train_loss"] - math.log(10)) < 1.0
    assert math.isfinite(rec["val_loss"]) and rec["val_loss"] > math.log(10) - 0.5


# --------------------------------------------------------------------------- folder loader


@pytest.fixture
def jpeg_root(tmp_path):
    """A tiny image folder of JPEG files: 2 classes, 4 train and 2 val images each."""
    root = tmp_path / "jpegs"
    for split, n in (("train", 4), ("val", 2)):
        for label, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), (30 * i, 100 * label, 90)).save(
                    root / split / cls / f"{i}.jpg", "JPEG")
    return str(root)


def folder_cfg(root, **data):
    d = {"dataset": "folder", "root": root, "batch_size": 4, "workers": 1,
         "train": {"scale": [32, 48], "crop": 32}, "val": {"resize": 36, "crop": 32}, **data}
    return load_config(data={"data": d})


def data_loaders(bundle) -> list[DataLoader]:
    """The torch DataLoader inside each of the bundle's two loaders."""
    found = []
    for loader in (bundle.train, bundle.val):
        (dl,) = [v for v in vars(loader).values() if isinstance(v, DataLoader)]
        found.append(dl)
    return found


@pytest.mark.parametrize("prefetch", [3, 7])
def test_prefetch_reaches_the_dataloaders(jpeg_root, prefetch):
    b = build_data(folder_cfg(jpeg_root, prefetch=prefetch), CPU)
    try:
        assert [dl.prefetch_factor for dl in data_loaders(b)] == [prefetch, prefetch]
        assert [dl.num_workers for dl in data_loaders(b)] == [1, 1]
    finally:
        b.train.close()
        b.val.close()


@pytest.mark.parametrize("device, key, pinned", [
    ("cpu", True, False),      # nothing to pin for: off whatever the key says
    ("cpu", False, False),
    ("cuda", True, True),      # the key decides on CUDA
    ("cuda", False, False),
])
def test_pin_memory_only_for_cuda_and_when_asked(jpeg_root, monkeypatch, device, key, pinned):
    from resnet_train.data import folder
    if device == "cuda" and not torch.cuda.is_available():
        # Without a GPU the DevicePrep (mean/std tensors on the device) cannot be built;
        # everything else of the CUDA build is device-agnostic until the first batch.
        monkeypatch.setattr(folder, "DevicePrep", lambda *a, **k: None)
    b = build_data(folder_cfg(jpeg_root, pin_memory=key), torch.device(device))
    try:
        assert [dl.pin_memory for dl in data_loaders(b)] == [pinned, pinned]
    finally:
        b.train.close()
        b.val.close()


# --------------------------------------------------------------------------- console progress

STEP_LINE = re.compile(r"epoch \d+ step \d+/\d+ ")


@pytest.mark.parametrize("mode", ["bar", "none", "lines"])
def test_progress_modes(tmp_path, capsys, mode):
    assert train_cli.main(tiny(str(tmp_path / mode), f"run.progress={mode}",
                               "train.epochs=1")) == 0
    out = capsys.readouterr().out
    assert "epoch 0: train loss" in out  # the epoch summary shows in every mode
    bar = re.compile(r"epoch 0: +\d+%\|[█▏▎▍▌▋▊▉ ]*\| \d/8 \[.*loss=[\d.]+, top1=[\d.]+, "
                     r"lr=[\d.]+, img/s=\d+")
    if mode == "bar":  # tqdm: desc, percentage, bar, n/total and the postfix values
        assert bar.search(out), out
        assert "| 8/8 [" in out and "█" in out
        assert not STEP_LINE.search(out)
    elif mode == "none":
        assert not bar.search(out) and "%|" not in out
        assert not STEP_LINE.search(out), out
    else:  # the control: run.log_every=4 of tiny() gives lines at steps 4 and 8
        assert re.findall(r"epoch 0 step (\d)/8 loss ", out) == ["4", "8"]
        assert "%|" not in out


# --------------------------------------------------------------------------- global torch state


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_run_leaves_torch_global_flags_as_it_found_them(tmp_path, monkeypatch,
                                                          deterministic):
    """An in-process run (embedded use, these tests) must not leave deterministic
    algorithms on or cudnn.benchmark changed for the code that runs after it."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    during = []
    real = models.build_model

    def build_model(*args, **kwargs):  # what the run saw while it trained
        during.append((torch.are_deterministic_algorithms_enabled(),
                       torch.backends.cudnn.benchmark))
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "build_model", build_model)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False
    try:
        assert train_cli.main(tiny(str(tmp_path / "r"), f"run.deterministic={deterministic}",
                                   "train.epochs=1")) == 0
        # the run did switch them (else this test would pass with the feature deleted) ...
        assert during == [(deterministic, not deterministic)]
        # ... and put them back
        assert torch.are_deterministic_algorithms_enabled() is False
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]

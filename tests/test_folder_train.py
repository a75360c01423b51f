"""Training and evaluating on an image folder: bad-image reports, the test-time protocols."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from resnet_train.cli import eval as eval_cli
from resnet_train.cli import train as train_cli
from resnet_train.data.prep import IMAGENET_MEAN, IMAGENET_STD
from resnet_train.data.views import resize_short
from resnet_train.engine import view_scorer
from resnet_train.models import build_model
from resnet_train.runtime import Runtime

from .helpers import records

W, H = 44, 34
CLASSES = ("circle", "hstripes", "vstripes")


def picture(cls: int, seed: int) -> Image.Image:
    """A class-dependent pattern with noise: views of one image really differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    if cls == 0:
        base = ((xx - W / 2) ** 2 + (yy - H / 2) ** 2 < 120).astype(np.float32)
    elif cls == 1:
        base = (np.sin(yy * 0.9) > 0).astype(np.float32)
    else:
        base = (np.sin(xx * 0.9) > 0).astype(np.float32)
    ramp = xx / W  # left-right asymmetry: a flip changes the pixels
    rgb = np.stack([base * 200 + 40 * ramp, base * 120 + 60 * (1 - ramp), 80 * ramp], -1)
    rgb += rng.normal(0, 20, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    seed = 0
    for split, n in (("train", 16), ("val", 3)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                picture(c, seed).save(d / f"{i:03d}.jpg", quality=95)
                seed += 1
    (root / "train" / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(300))
    (root / "val" / "hstripes" / "notes.png").write_text("not an image")
    return str(root)


def folder_args(root, run_dir, *extra):
    return ["data.dataset=folder", f"data.root={root}", "data.workers=0", "data.batch_size=10",
            "data.train.scale=[34,44]", "data.train.crop=32", "data.val.resize=34",
            "data.val.crop=32", "data.train.pca_lighting=0.0",
            "model.arch=resnet20", "model.width=4", "train.epochs=2", "train.amp=none",
            "train.channels_last=false", "optim.lr=0.05", "schedule.name=multistep",
            "schedule.milestones=[1]", "run.progress=lines", "run.seed=5",
            f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    assert train_cli.main(folder_args(data_root, run_dir)) == 0
    return run_dir


def test_bad_images_are_counted_per_epoch_and_reported(trained, capsys):
    recs = records(trained)
    assert [r["epoch"] for r in recs] == [0, 1]
    # 49 train files, batch 10: 40 used per epoch, so the broken file shows up some epochs.
    assert all(r["bad_images"] in (0, 1) for r in recs)
    assert [r["val_bad_images"] for r in recs] == [1, 1]  # val reads every file every epoch
    assert [r["val_n"] for r in recs] == [9, 9]  # the bad one is not counted


BROKEN = ("circle/broken0.jpg", "hstripes/broken1.jpg", "vstripes/broken2.jpg")
# every train image in every epoch (40 files, batch 10): each epoch meets each broken file
BAD_ARGS = ("train.precise_bn=2", "model.log_block_norms=true", "run.diagnostics_every=2",
            "data.val.final_protocol=ten_crop", "checkpoint.every_steps=3")


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    """40 train files, 3 of them unreadable; 10 val files, 1 unreadable."""
    root = tmp_path_factory.mktemp("bad")
    for split, n in (("train", (13, 12, 12)), ("val", (3, 3, 3))):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n[c]):
                picture(c, 100 * c + i).save(root / split / name / f"{i:03d}.jpg")
    for name in BROKEN:
        (root / "train" / name).write_bytes(b"\xff\xd8\xff" + os.urandom(200))
    (root / "val" / "hstripes" / "notes.png").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def bad_run(bad_root, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("badrun"))
    assert train_cli.main(folder_args(bad_root, run_dir, *BAD_ARGS)) == 0
    return run_dir


def test_each_unreadable_image_is_counted_once_an_epoch(bad_run):
    """Precise BN and the block norms (epoch end and diagnostics) read batches again:
    only the training and the validation passes count."""
    assert [r["bad_images"] for r in records(bad_run)] == [3, 3]
    assert [r["val_bad_images"] for r in records(bad_run)] == [1, 1]
    (final,) = records(bad_run, "final")  # the final evaluation's own pass
    assert final["val_bad_images"] == 1 and final["val_n"] == 9


@pytest.mark.parametrize("stop_at", [6, 0], ids=["mid-epoch", "during-validation"])
def test_a_stopped_run_reports_the_bad_images_of_an_uninterrupted_one(
        bad_root, bad_run, tmp_path, monkeypatch, capsys, stop_at):
    """Stopped at epoch 1 step 2 (4 steps an epoch), or during epoch 0's validation (poll
    0 is a validation batch's), then resumed: the counts and the named files are those of
    the run that was never stopped (the count so far is in the checkpoint)."""
    from resnet_train.trainer import PREEMPTED_EXIT, StopFlag
    poll, fired = StopFlag.poll, []

    def preempt(self, step):
        if step == stop_at and not fired:
            fired.append(step)
            self.received = "SIGTERM"
        return poll(self, step)
    monkeypatch.setattr(StopFlag, "poll", preempt)
    run_dir = str(tmp_path / "run")
    assert train_cli.main(folder_args(bad_root, run_dir, *BAD_ARGS)) == PREEMPTED_EXIT
    saved = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert saved["epoch_end_pending"] == (stop_at == 0)
    if stop_at == 0:  # the whole of epoch 0 trained: its three
        assert saved["bad_images"]["count"] == 3
        assert sorted(saved["bad_images"]["paths"]) == [os.path.join(bad_root, "train", b)
                                                        for b in BROKEN]
    capsys.readouterr()
    assert train_cli.main(folder_args(bad_root, run_dir, *BAD_ARGS)) == 0
    out = capsys.readouterr().out
    keys = ("epoch", "bad_images", "val_bad_images")
    assert [[r[k] for k in keys] for r in records(run_dir)] == \
        [[r[k] for k in keys] for r in records(bad_run)] == [[0, 3, 1], [1, 3, 1]]
    named = [line for line in out.splitlines() if "unreadable train images" in line]
    assert len(named) == (2 if stop_at == 0 else 1)  # the epoch ends of the resumed run
    assert all(os.path.basename(b) in named[0] for b in BROKEN), named


def test_resnet_eval_reports_the_unreadable_images_it_left_out(bad_run, bad_root, capsys):
    last = os.path.join(bad_run, "checkpoints", "last.pt")
    r = eval_cli.evaluate_checkpoint(last, None, [f"data.root={bad_root}"])
    assert r["protocols"]["center"]["bad_images"] == 1 and r["n"] == 9
    assert r["protocols"]["center"]["bad_paths"][0].endswith("notes.png")
    capsys.readouterr()
    assert eval_cli.main(["--checkpoint", last, f"data.root={bad_root}"]) == 0
    assert "warning: center: skipped 1 unreadable images (not counted in N)" in \
        capsys.readouterr().out


def test_bad_image_warning_names_the_file(data_root, tmp_path, capsys):
    assert train_cli.main(folder_args(data_root, str(tmp_path / "r"), "train.epochs=1")) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "unreadable val images" in text and "notes.png" in text


def _model_and_prep(trained):
    ckpt = torch.load(os.path.join(trained, "checkpoints", "last.pt"), weights_only=True)
    model = build_model("resnet20", 3, width=4)
    model.load_state_dict(ckpt["model"])
    model.eval()
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return model, norm


def _val_images(root):
    for label, name in enumerate(CLASSES):
        d = os.path.join(root, "val", name)
        for f in sorted(os.listdir(d)):
            if f.endswith(".jpg"):
                yield Image.open(os.path.join(d, f)).convert("RGB"), label


def _reference(trained, root, views_of) -> dict:
    """Loss and top-1 of the mean softmax over torchvision-made views, image by image."""
    model, norm = _model_and_prep(trained)
    loss, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for img, label in _val_images(root):
            probs = torch.stack([F.softmax(model(norm(v).unsqueeze(0)), 1)[0]
                                 for v in views_of(img)]).mean(0)
            loss -= probs[label].log().item()
            hits += int(probs.argmax().item() == label)
            n += 1
    return {"loss": loss / n, "top1": hits / n, "n": n}


def _eval(trained, root, *extra):
    return eval_cli.evaluate_checkpoint(
        os.path.join(trained, "checkpoints", "last.pt"), None,
        [f"data.root={root}", "data.on_bad_image=error", *extra])


@pytest.fixture
def clean_root(data_root, tmp_path):
    """The same val images without the unreadable file (the reference can't skip it)."""
    import shutil
    root = tmp_path / "clean"
    shutil.copytree(data_root, root)
    os.remove(root / "val" / "hstripes" / "notes.png")
    os.remove(root / "train" / "circle" / "broken.jpg")
    return str(root)


def test_ten_crop_eval_matches_torchvision_ten_crop(trained, clean_root):
    # run.device=cpu: the reference's device (a GPU's TF32 convolutions differ by more)
    got = _eval(trained, clean_root, "data.val.protocol=ten_crop", "run.device=cpu")
    tv = T.Compose([T.Resize(34), T.TenCrop(32)])
    ref = _reference(trained, clean_root, lambda img: [T.functional.to_tensor(v) for v in tv(img)])
    assert got["protocol"] == "ten_crop" and got["n"] == ref["n"] == 9
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)  # decoding and views agree
    assert got["top1"] == ref["top1"]
    centre = _eval(trained, clean_root, "run.device=cpu")
    assert centre["protocol"] == "center" and centre["n"] == 9
    assert abs(centre["loss"] - got["loss"]) > 1e-4  # the views really were averaged


@pytest.mark.parametrize("protocol,decode", [("center", "cpu"), ("ten_crop", "cpu"),
                                             ("multiscale", "cpu"), ("center", "device")])
def test_an_unreadable_val_image_is_not_counted(trained, data_root, clean_root, protocol,
                                                decode):
    """Each image is counted once: with an unreadable file in val/ (replaced in its batch
    by a readable one, which is not counted either), every number equals the clean split's;
    also when the batch is decoded on the device (here torchvision's CPU decode_jpeg)."""
    args = [f"data.val.protocol={protocol}", "data.val.scales=[32,40]", f"data.decode={decode}"]
    ckpt = os.path.join(trained, "checkpoints", "last.pt")
    got = eval_cli.evaluate_checkpoint(ckpt, None, [f"data.root={data_root}", *args],
                                       per_class=True)
    ref = eval_cli.evaluate_checkpoint(ckpt, None, [f"data.root={clean_root}", *args],
                                       per_class=True)
    got, ref = got["protocols"][protocol], ref["protocols"][protocol]
    assert got["bad_images"] == 1 and ref["bad_images"] == 0
    assert got["n"] == ref["n"] == 9
    assert (got["top1"], got["top5"]) == (ref["top1"], ref["top5"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["per_class"] == ref["per_class"]


def test_multiscale_eval_matches_full_image_reference(trained, clean_root):
    got = _eval(trained, clean_root, "data.val.protocol=multiscale", "data.val.scales=[32,40]",
                "data.val.flip=true", "run.device=cpu")  # (the reference's device)

    def views(img):
        out = []
        for s in (32, 40):
            v = T.functional.to_tensor(T.functional.resize(img, s, antialias=True))
            out += [v, v.flip(-1)]
        return out
    ref = _reference(trained, clean_root, views)
    assert got["n"] == 9 and got["protocol"] == "multiscale"
    # one bilinear antialiased resampling on the device vs PIL's: close, not bitwise
    assert got["loss"] == pytest.approx(ref["loss"], rel=2e-3)


def test_view_scorer_averages_softmax_over_views():
    NCHW = Runtime(torch.device("cpu"), None, False)
    torch.manual_seed(0)
    model = build_model("resnet20", 5, width=4).eval()
    x = torch.randn(3, 10, 3, 16, 16)
    with torch.no_grad():
        got = view_scorer("ten_crop", 16)(model, x, NCHW)
        ref = torch.stack([F.softmax(model(x[:, k]), 1) for k in range(10)]).mean(0).log()
        assert torch.allclose(got, ref, atol=1e-5)
        one = torch.randn(1, 3, 20, 26)
        got = view_scorer("multiscale", 16, (16, 24), True)(model, one, NCHW)
        views = [resize_short(one, 16), resize_short(one, 24)]
        views = [v for y in views for v in (y, y.flip(-1))]
        assert [v.shape[-2:] for v in views[::2]] == [(16, 20), (24, 31)]
        ref = torch.stack([F.softmax(model(v), 1) for v in views]).mean(0).log()
        assert torch.allclose(got, ref, atol=1e-5)
    assert view_scorer("center", 16) is None


def test_multiscale_validation_runs_without_cudnn_autotuning(data_root, tmp_path, monkeypatch):
    """Each multiscale batch is one image of its own size: cudnn.benchmark (on while
    training) is off for those passes and back on after; a centre-crop pass keeps it."""
    from resnet_train import trainer
    seen, real = [], trainer.evaluate

    def evaluate(*a, **k):
        seen.append((k.get("views") is not None, torch.backends.cudnn.benchmark))
        return real(*a, **k)
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    for protocol in ("center", "multiscale"):
        assert train_cli.main(folder_args(data_root, str(tmp_path / protocol), "train.epochs=1",
                                          f"data.val.protocol={protocol}",
                                          "data.val.scales=[32]")) == 0
    assert seen == [(False, True), (True, False)]


def test_a_layout_of_the_other_format_is_made_the_models():
    from resnet_train.runtime import Runtime
    nhwc = torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    assert Runtime(cpu, None, False).layout(nhwc).is_contiguous()
    assert Runtime(cpu, None, True).layout(nhwc.contiguous()).is_contiguous(
        memory_format=torch.channels_last)


def test_ten_crop_validation_during_training_with_block_norms(data_root, tmp_path):
    run_dir = str(tmp_path / "tc")
    assert train_cli.main(folder_args(data_root, run_dir, "train.epochs=1",
                                      "data.val.protocol=ten_crop",
                                      "model.log_block_norms=true")) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    norms = [t for t in acc.Tags()["scalars"] if t.startswith("block_norms/")]
    assert len(norms) == 9  # resnet20: 3 stages x 3 blocks
    assert records(run_dir)[0]["val_n"] == 9  # (the unreadable val file is not counted)


def test_per_pixel_mean_cache_for_many_image_sizes_is_bounded():
    from resnet_train.data.prep import DevicePrep
    prep = DevicePrep(torch.rand(3, 8, 8))
    for h in range(20, 120):
        out = prep(torch.full((1, 3, h, 17), 100, dtype=torch.uint8))
        assert out.shape == (1, 3, h, 17)
    assert len(prep._resized_offsets) <= 64


def test_pixel_mean_is_stored_in_the_checkpoint_and_never_rescanned(data_root, tmp_path,
                                                                    monkeypatch):
    """The checkpoint holds the mean image: resnet-eval and a resumed run use it exactly,
    without the training-set scan (and without the run directory's cache)."""
    from resnet_train import checkpoint as ckpt_io
    from resnet_train.data import folder
    run_dir = str(tmp_path / "run")
    args = folder_args(data_root, run_dir, "data.normalize=pixel_mean", "data.divide_std=false",
                       "data.pixel_mean_samples=0",
                       "run.deterministic=true",  # (GPU: the convolutions resnet-eval runs)
                       "train.epochs=1")
    assert train_cli.main(args) == 0
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    norm = ckpt_io.load(last)["normalization"]
    (cache,) = [f for f in os.listdir(run_dir) if f.startswith("pixel_mean_")]
    assert norm["normalize"] == "pixel_mean" and norm["std"] is None
    assert norm["mean"].shape == (3, 32, 32)
    torch.testing.assert_close(norm["mean"], torch.from_numpy(
        np.load(os.path.join(run_dir, cache))).float())
    os.remove(os.path.join(run_dir, cache))
    monkeypatch.setattr(folder, "pixel_mean_image",
                        lambda *a, **k: pytest.fail("the training set was scanned again"))
    got = eval_cli.evaluate_checkpoint(last, None, ["data.on_bad_image=skip"])
    (epoch0,) = records(run_dir, "epoch")
    assert got["n"] == epoch0["val_n"]
    assert got["top1"] == pytest.approx(epoch0["val_top1"]) and \
        got["loss"] == pytest.approx(epoch0["val_loss"], rel=1e-5)
    assert train_cli.main(args[:-1] + ["train.epochs=2"]) == 0  # resumes; no scan either
    assert len(records(run_dir, "epoch")) == 2


def test_final_evaluation_uses_the_configured_protocol(clean_root, tmp_path, capsys):
    """data.val.final_protocol: one more pass after the last epoch under the paper's test
    protocol; its record (metrics.jsonl "final", the checkpoint's final_eval) names it and
    equals resnet-eval of the same weights under that protocol."""
    from resnet_train import checkpoint as ckpt_io
    run_dir = str(tmp_path / "run")
    assert train_cli.main(folder_args(clean_root, run_dir, "train.epochs=1",
                                      "data.val.final_protocol=ten_crop",
                                      "run.deterministic=true")) == 0  # (GPU: see e2e)
    (epoch0,) = records(run_dir, "epoch")
    (final,) = records(run_dir, "final")
    assert epoch0["val_protocol"] == "center" and final["protocol"] == "ten_crop"
    assert final["val_n"] == epoch0["val_n"] == 9 and final["epoch"] == 0
    assert "final evaluation (ten_crop)" in capsys.readouterr().out
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    assert ckpt_io.load(last)["final_eval"] == final
    ref = _eval(run_dir, clean_root, "data.val.protocol=ten_crop")
    center = _eval(run_dir, clean_root)
    assert ref["top1"] == pytest.approx(final["val_top1"])
    assert ref["loss"] == pytest.approx(final["val_loss"], rel=1e-5)
    assert center["loss"] == pytest.approx(epoch0["val_loss"], rel=1e-5)
    assert center["loss"] != pytest.approx(final["val_loss"], rel=1e-5)  # another protocol


def test_final_protocol_needs_full_size_images(tmp_path, capsys):
    from .helpers import tiny
    assert train_cli.main(tiny(tmp_path / "r", "data.val.final_protocol=multiscale")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.val.final_protocol" in err[0] and "synthetic" in err[0]
    # the per-epoch protocol too: ten 16 px views of a 16 px image would be a wrong number
    assert train_cli.main(tiny(tmp_path / "s", "data.val.protocol=ten_crop")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.val.protocol: ten_crop" in err[0] and "synthetic" in err[0]

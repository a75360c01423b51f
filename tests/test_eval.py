"""resnet-eval: several protocols in one call, per-class tables, torchrun counts, --weights."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from resnet_train import __version__
from resnet_train.cli import eval as eval_cli
from resnet_train.cli import train as train_cli
from resnet_train.config import dump, from_dict
from resnet_train.distributed import DistInfo
from resnet_train.engine import evaluate
from resnet_train.models import build_model
from resnet_train.runtime import Runtime

from .helpers import records
from .test_distributed import torchrun

CLASSES = ("ant", "bee", "cow")
W, H = 40, 30
VAL_PER_CLASS = 5  # 15 images: not a multiple of 2 ranks x 3 per rank
PROTOCOLS = ["center", "ten_crop", "multiscale"]
CPU = Runtime(torch.device("cpu"), None, False)


def _picture(cls: int, seed: int) -> Image.Image:
    """A class pattern with noise and a left-right ramp (flips and crops change pixels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = [((xx - W / 2) ** 2 + (yy - H / 2) ** 2 < 90), np.sin(yy * 0.9) > 0,
            np.sin(xx * 0.9) > 0][cls].astype(np.float32)
    ramp = xx / W
    rgb = np.stack([base * 190 + 50 * ramp, base * 110 + 70 * (1 - ramp), 90 * ramp], -1)
    rgb += rng.normal(0, 35, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_folder")
    seed = 0
    for split, n in (("train", 6), ("val", VAL_PER_CLASS)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                _picture(c, seed).save(root / split / name / f"{i:02d}.jpg", quality=95)
                seed += 1
    return str(root)


@pytest.fixture(scope="module")
def ckpt(folder, tmp_path_factory):
    """One epoch (3 steps) of a width-4 ResNet-20 on the folder: last.pt. Precise BN
    statistics, so that it does not call every image one class (some right, some wrong)."""
    run_dir = str(tmp_path_factory.mktemp("eval_run"))
    assert train_cli.main(_train_args(folder, run_dir)) == 0
    return os.path.join(run_dir, "checkpoints", "last.pt")


def _train_args(folder: str, run_dir: str) -> list[str]:
    return ["data.dataset=folder", f"data.root={folder}", "data.workers=0",
            "data.batch_size=6", "data.train.scale=[30,40]", "data.train.crop=28",
            "data.val.resize=30", "data.val.crop=28", "data.val.scales=[28,36]",
            "model.arch=resnet20", "model.width=4", "train.epochs=1", "train.amp=none",
            "train.channels_last=false", "optim.lr=0.1", "train.precise_bn=3", "run.progress=lines",
            "run.seed=4", f"run.dir={run_dir}",
            # on the CPU where a GPU is visible too: the torchrun test's two ranks cannot share
            # one GPU, and the direct counts below are made on the CPU
            "run.device=cpu"]


@pytest.fixture(scope="module")
def multi(ckpt):
    """All three protocols with --per-class in one single-process call."""
    return eval_cli.evaluate_checkpoint(ckpt, None, [], PROTOCOLS, per_class=True)


def _synthetic_config(tmp_path, **data) -> str:
    cfg = {"model": {"arch": "resnet20", "width": 4},
           "data": {"dataset": "synthetic", "image_size": 16, "train_samples": 64,
                    "val_samples": 40, "batch_size": 16, **data},
           "train": {"amp": "none", "channels_last": "false"}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _plain_state(num_classes: int, path, seed: int = 0) -> dict:
    """A width-4 ResNet-20's state dict with non-trivial BN statistics, saved to ``path``."""
    torch.manual_seed(seed)
    state = build_model("resnet20", num_classes, width=4).state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.normal_(0, 0.2)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
    torch.save(state, path)
    return state


# --------------------------------------------------------------------------- protocols


def test_protocols_in_one_call_equal_one_call_each(ckpt, multi):
    """One model, a loader per protocol: each row is what a call with only that
    data.val.protocol gives; the rows differ (the views really change), and the JSON
    geometry keys are each protocol's own."""
    assert list(multi["protocols"]) == PROTOCOLS
    for p in PROTOCOLS:
        one = eval_cli.evaluate_checkpoint(ckpt, None, [f"data.val.protocol={p}"])
        got = multi["protocols"][p]
        assert list(one["protocols"]) == [p] and one["protocol"] == p
        assert got["n"] == one["n"] == 3 * VAL_PER_CLASS
        assert got["top1"] == one["top1"] and got["top5"] == one["top5"]
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-9)
        assert got["images_per_s"] == pytest.approx(got["n"] / got["seconds"])
    rows = multi["protocols"]
    losses = {rows[p]["loss"] for p in PROTOCOLS}
    assert len(losses) == 3
    assert (rows["center"]["resize"], rows["center"]["crop"]) == (30, 28)
    assert (rows["multiscale"]["scales"], rows["multiscale"]["flip"]) == ([28, 36], False)
    assert "scales" not in rows["ten_crop"] and "resize" not in rows["multiscale"]
    # the top level is the first protocol's, as one-protocol resnet-eval wrote it
    assert (multi["protocol"], multi["top1"], multi["n"]) == ("center", rows["center"]["top1"],
                                                              15)
    assert multi["epoch"] == torch.load(ckpt, weights_only=True)["epoch"]
    assert multi["arch"] == "resnet20" and multi["weights"] is None


def test_table_json_and_per_class_printout(ckpt, multi, tmp_path, capsys):
    out = tmp_path / "eval.json"
    # key=value after the protocols is an override, not a protocol
    assert eval_cli.main(["--checkpoint", ckpt, "--protocol", "center", "multiscale",
                          "data.val.flip=true", "--per-class", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    r = json.loads(out.read_text())
    assert r["checkpoint"] == os.path.abspath(ckpt) and list(r["protocols"]) == ["center",
                                                                                 "multiscale"]
    assert r["protocols"]["multiscale"]["flip"] is True
    assert r["protocols"]["center"]["top1"] == multi["protocols"]["center"]["top1"]
    header = next(i for i, line in enumerate(printed) if "top-1 err %" in line)
    for line, name in zip(printed[header + 1:header + 3], ("center", "multiscale"),
                          strict=True):
        p = r["protocols"][name]
        cols = line.split()
        assert cols[0] == name
        assert cols[1:5] == [f"{100 * (1 - p['top1']):.2f}", f"{100 * (1 - p['top5']):.2f}",
                             f"{100 * p['top1']:.2f}", f"{100 * p['top5']:.2f}"]
        assert cols[5:7] == [f"{p['loss']:.4f}", "15"]
        assert float(cols[7]) == pytest.approx(p["images_per_s"], abs=0.06)
    text = "\n".join(printed)
    assert "per class (center): the 3 worst of 3 classes by top-1" in text
    worst = min(r["protocols"]["center"]["per_class"], key=lambda c: (c["top1"], c["class"]))
    assert f"{worst['name']:<20}{100 * worst['top1']:>8.2f}  {worst['correct']} / 5" in text
    for pair in r["protocols"]["center"]["confused"]:
        assert f"  {pair['true_name']} -> {pair['predicted_name']}: {pair['count']}" in text


def test_per_class_is_the_confusion_of_a_direct_count(ckpt, multi):
    """Per-class counts and confused pairs equal an independent count of (true, argmax)
    over the centre-crop batches; the class names are the folder names."""
    from resnet_train.data import build_data
    c = torch.load(ckpt, weights_only=True)
    cfg = from_dict(c["config"])
    data = build_data(cfg, torch.device("cpu"), norm=c["normalization"])
    model = build_model("resnet20", 3, width=4)
    model.load_state_dict(c["model"])
    model.eval()
    counts = np.zeros((3, 3), dtype=np.int64)
    with torch.no_grad():
        for x, y in data.val.batches(0):
            pred = model(data.val_prep(x)).argmax(1)
            for t, p in zip(y.tolist(), pred.tolist(), strict=True):
                counts[t, p] += 1
    got = multi["protocols"]["center"]
    assert [row["name"] for row in got["per_class"]] == list(CLASSES)
    assert [row["n"] for row in got["per_class"]] == counts.sum(1).tolist() == [5, 5, 5]
    assert [row["correct"] for row in got["per_class"]] == counts.diagonal().tolist()
    assert sum(row["correct"] for row in got["per_class"]) == round(got["top1"] * 15)
    off = [(int(counts[t, p]), t, p) for t in range(3) for p in range(3)
           if t != p and counts[t, p]]
    expected = [(t, p, n) for n, t, p in sorted(off, key=lambda e: (-e[0], e[1], e[2]))]
    assert [(q["true"], q["predicted"], q["count"]) for q in got["confused"]] == expected
    assert all(q["true_name"] == CLASSES[q["true"]] for q in got["confused"])


def test_evaluate_confusion_counts_pairs_and_its_trace_is_top1():
    """The device confusion matrix: rows the true class, columns the top-1 prediction;
    without confusion= there is none (the default path is unchanged)."""
    logits = torch.tensor([[5., 1, 0], [0, 5, 1], [5, 0, 1], [0, 1, 5], [1, 5, 0]])
    labels = torch.tensor([0, 1, 1, 2, 2])

    class Split:
        def batches(self, epoch, start=0):
            yield logits[:3], labels[:3]
            yield logits[3:], labels[3:]

    identity = torch.nn.Identity()
    r = evaluate(identity, Split(), lambda x: x, CPU, DistInfo(), confusion=3)
    assert r["confusion"].dtype == torch.int64
    assert r["confusion"].tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert int(r["confusion"].trace()) == round(r["top1"] * r["n"]) == 3
    assert r["n"] == 5 and "confusion" not in evaluate(identity, Split(), lambda x: x, CPU,
                                                       DistInfo())


def test_view_scores_stay_finite_when_every_view_rules_a_class_out():
    """log(mean softmax) as logsumexp(log_softmax) - log(views): the plain formula where
    float32 holds the probabilities, finite where they underflow (a confident wrong
    ten-crop would otherwise make the loss inf)."""
    from resnet_train.engine import view_scorer

    def model(batch):  # (views, 3, 1, 1) -> (views, 3): the pixels are the logits
        return batch.flatten(1)

    score = view_scorer("ten_crop", 1)
    mild = torch.tensor([[0.0, 1.0, 2.0], [0.5, 0.0, -1.0]]).repeat(5, 1)  # 10 views
    torch.testing.assert_close(score(model, mild.view(1, 10, 3, 1, 1), CPU),
                               F.softmax(mild, 1).mean(0, keepdim=True).log())
    sure = torch.tensor([[0.0, 200.0, -200.0], [200.0, 0.0, -200.0]]).repeat(5, 1)
    assert F.softmax(sure, 1).mean(0).log()[2] == float("-inf")  # the plain formula
    got = score(model, sure.view(1, 10, 3, 1, 1), CPU)[0]
    assert got[2].item() == pytest.approx(-400.0, rel=1e-6)  # p = e^-400 on every view
    assert got[:2].exp().tolist() == pytest.approx([0.5, 0.5])


def test_per_class_tables_order_ties_and_names():
    conf = torch.tensor([[3, 1, 0], [2, 0, 2], [0, 0, 0]])
    t = eval_cli.per_class_tables(conf, ["a", "b", "c"])
    assert [(c["name"], c["n"], c["correct"], c["top1"]) for c in t["per_class"]] == [
        ("a", 4, 3, 0.75), ("b", 4, 0, 0.0), ("c", 0, 0, None)]
    # most confused first, ties in (true, predicted) order
    assert [(p["true_name"], p["predicted_name"], p["count"]) for p in t["confused"]] == [
        ("b", "a", 2), ("b", "c", 2), ("a", "b", 1)]
    # no names (or not one per class): indices
    assert [c["name"] for c in eval_cli.per_class_tables(conf, None)["per_class"]] == \
        ["0", "1", "2"]


def test_torchrun_counts_every_image_once(ckpt, multi, tmp_path):
    """2 ranks (15 images, 3 per rank per batch): N, top-1/top-5 and the confusion of every
    protocol equal the single process exactly; rank 0 alone prints and writes."""
    out = tmp_path / "ddp.json"
    r = torchrun(2, "eval", "--checkpoint", ckpt, "--protocol", *PROTOCOLS, "--per-class",
                 "--json", out, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("top-1 err %") == 1 and r.stdout.count("per class (center)") == 1
    ddp = json.loads(out.read_text())
    for p in PROTOCOLS:
        got, one = ddp["protocols"][p], multi["protocols"][p]
        assert got["n"] == one["n"] == 15
        assert (got["top1"], got["top5"]) == (one["top1"], one["top5"])
        assert got["per_class"] == one["per_class"] and got["confused"] == one["confused"]
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-6)


# --------------------------------------------------------------------------- --weights


def test_weights_score_exactly_what_the_checkpoint_scores(ckpt, multi, tmp_path):
    """The checkpoint's weights as a plain state dict, under its config as a YAML file:
    the same numbers for every protocol (the config's mean/std: no rescan needed)."""
    c = torch.load(ckpt, weights_only=True)
    plain, cfg = tmp_path / "plain.pt", tmp_path / "run.yaml"
    torch.save(c["model"], plain)
    cfg.write_text(dump(from_dict(c["config"])))
    out = tmp_path / "w.json"
    assert eval_cli.main(["--weights", str(plain), "--arch", "resnet20", "--config", str(cfg),
                          "--protocol", "center", "ten_crop", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["weights"] == str(plain) and r["from"] == "native" and r["checkpoint"] is None
    for p in ("center", "ten_crop"):
        got, one = r["protocols"][p], multi["protocols"][p]
        assert (got["n"], got["top1"], got["top5"]) == (one["n"], one["top1"], one["top5"])
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-9)


def test_from_akamaster_converts_before_scoring(tmp_path, capsys):
    """--from akamaster (or the config's model.weights_from) reaches the importer: an
    akamaster-layout file scores what its converted state dict scores; read as native it
    does not fit (exit 2)."""
    from resnet_train.weights import load_weights
    state = _plain_state(10, tmp_path / "ours.pt")
    theirs = {"module." + ("linear." + k[3:] if k.startswith("fc.") else k): v
              for k, v in state.items() if not k.endswith("num_batches_tracked")}
    aka = tmp_path / "aka.th"
    torch.save({"state_dict": theirs, "best_prec1": 91.0}, aka)
    converted = tmp_path / "converted.pt"
    torch.save(load_weights(str(aka), source="akamaster"), converted)
    cfg = _synthetic_config(tmp_path)
    results = []
    for i, (spec, extra) in enumerate(((aka, ["--from", "akamaster"]), (converted, []),
                                       (aka, ["model.weights_from=akamaster"]))):
        out = tmp_path / f"{i}.json"
        assert eval_cli.main(["--weights", str(spec), "--arch", "resnet20", "--config", cfg,
                              *extra, "--json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert [r["from"] for r in results] == ["akamaster", "native", "akamaster"]
    assert results[0]["n"] == 40
    assert len({(r["top1"], r["loss"]) for r in results}) == 1
    # not their normalisation: said (twice: the two akamaster runs), and not when it is theirs
    assert capsys.readouterr().err.count("akamaster's weights were trained on") == 2
    theirs_norm = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
    assert eval_cli.main(["--weights", str(aka), "--arch", "resnet20", "--config", cfg,
                          "--from", "akamaster", *theirs_norm]) == 0
    assert "trained on" not in capsys.readouterr().err
    assert eval_cli.main(["--weights", str(aka), "--arch", "resnet20", "--config", cfg]) == 2


def test_torchvision_eval_config_scores_like_torchvision(folder, tmp_path):
    """imagenet_torchvision_eval.yaml builds torchvision's ResNet-50 (v1.5, shortcut B) and
    its eval transform (Resize, CenterCrop, its mean/std): a torchvision resnet50 state dict
    scores as torchvision's own model and transforms score it (small sizes for speed)."""
    import torchvision
    import torchvision.transforms as T
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(num_classes=3)
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tf = T.Compose([T.Resize(30), T.CenterCrop(28), T.ToTensor(), norm])
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        d = os.path.join(folder, "val", name)
        for f in sorted(os.listdir(d)):
            images.append(tf(Image.open(os.path.join(d, f)).convert("RGB")))
            labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    for m in tv.modules():  # BN statistics of these images: activations of a sane scale
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        tv.train()
        tv(x)
        tv.eval()
        logits = tv(x)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "tv.json"
    assert eval_cli.main(["--weights", str(tmp_path / "tv.pth"), "--arch", "resnet50",
                          "--config", "imagenet_torchvision_eval.yaml", f"data.root={folder}",
                          "data.val.resize=30", "data.val.crop=28", "data.batch_size=6",
                          "data.workers=0", "run.device=cpu",  # (the reference's device: a
                          "--json", str(out)]) == 0          # GPU's TF32 convs differ)
    r = json.loads(out.read_text())
    assert (r["arch"], r["dataset"], r["n"]) == ("resnet50", "imagenet", 15)
    assert r["top1"] == (logits.argmax(1) == y).double().mean().item()
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)


# --------------------------------------------------------------------------- bad input


def test_bad_calls_exit_2_with_one_line(ckpt, tmp_path, capsys):
    plain3, plain10 = tmp_path / "three.pt", tmp_path / "ten.pt"
    _plain_state(3, plain3)
    _plain_state(10, plain10)
    cfg = _synthetic_config(tmp_path)
    w10 = ["--weights", str(plain10), "--arch", "resnet20", "--config", cfg]
    cases = [
        ([], "exactly one of --checkpoint"),
        (["--checkpoint", ckpt, "--weights", str(plain3)], "exactly one of --checkpoint"),
        (["--checkpoint", ckpt, "--arch", "resnet20"], "--arch goes with --weights"),
        (["--checkpoint", ckpt, "--from", "akamaster"], "--from goes with --weights"),
        (["--weights", str(plain10), "--arch", "resnet20"], "--weights needs --config"),
        (["--weights", str(plain10), "--config", cfg], "--weights needs --arch"),
        ([*w10, "data.normalize=pixel_mean"], "data.normalize: pixel_mean"),
        (["--weights", str(plain3), "--arch", "resnet20", "--config", cfg],
         "its head fc has 3 classes, the model 10"),
        ([*w10, "--protocol", "center", "ten_crop"], "protocol ten_crop"),
        ([*w10, "--arch", "resnet32"], "does not fit"),
    ]
    for argv, culprit in cases:
        assert eval_cli.main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and culprit in err[0], (argv, err)
        assert captured.out == "", argv  # refused before any pass: no partial table
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--checkpoint", ckpt, "--protocol", "center", "five_crop"])
    assert e.value.code == 2 and "invalid choice: 'five_crop'" in capsys.readouterr().err


def test_version_and_choices_without_torch(capsys):
    """--version prints the version; the CLI's choices are the schema's (and the modules'),
    read without importing torch, so --version and --help are instant."""
    import subprocess
    import sys

    from resnet_train import weights
    from resnet_train.data.views import EVAL_PROTOCOLS
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"resnet-eval {__version__}\n"
    assert eval_cli.PROTOCOLS == EVAL_PROTOCOLS and eval_cli.SOURCES == weights.SOURCES
    probe = "import sys, resnet_train.cli.eval as m; m.parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.stdout.strip() == "False", r.stderr


# ----------------------------------------------------------------- labels by class name


def _val_only(folder: str, dest, drop: str | None = None, add: str | None = None) -> str:
    """A copy of the folder's val/ alone (no train/), less class ``drop``, plus a class
    folder ``add`` holding a copy of the first class's images."""
    shutil.copytree(os.path.join(folder, "val"), dest / "val")
    if drop:
        shutil.rmtree(dest / "val" / drop)
    if add:
        shutil.copytree(dest / "val" / CLASSES[0], dest / "val" / add)
    return str(dest)


def test_scoring_needs_no_train_split_and_labels_follow_the_checkpoint(ckpt, multi, folder,
                                                                     tmp_path, capsys):
    """A checkpoint scores a root holding only val/ (ImageNet's validation set alone) with
    the labels it learned: its stored class names, not the folders' order. With "bee"
    missing from val/, "cow" must stay label 2: the counts of ant and cow are those of the
    full split, class by class; folder order would have scored cow images as bee."""
    whole = multi["protocols"]["center"]
    def center(root: str) -> dict:
        return eval_cli.evaluate_checkpoint(ckpt, None, [f"data.root={root}"], ["center"],
                                            per_class=True)["protocols"]["center"]
    full = center(_val_only(folder, tmp_path / "a"))
    assert (full["n"], full["top1"], full["top5"]) == (whole["n"], whole["top1"], whole["top5"])
    assert full["loss"] == pytest.approx(whole["loss"], rel=1e-9)
    part = center(_val_only(folder, tmp_path / "b", drop="bee"))
    rows = {r["name"]: r for r in part["per_class"]}
    want = {r["name"]: r for r in whole["per_class"]}
    assert part["n"] == 2 * VAL_PER_CLASS and rows["bee"]["n"] == 0
    for name in ("ant", "cow"):
        assert (rows[name]["n"], rows[name]["correct"]) == (want[name]["n"], want[name]["correct"])
    capsys.readouterr()
    extra = _val_only(folder, tmp_path / "c", add="dog")
    assert eval_cli.main(["--checkpoint", ckpt, f"data.root={extra}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class folders not in the training split: dog" in err[0], err


def test_weights_without_train_split_label_by_val_folders(ckpt, multi, folder, tmp_path, capsys):
    """A plain state dict holds no class names: on a root with no train/, val/'s sorted
    folders give the labels, and one line says so."""
    c = torch.load(ckpt, weights_only=True)
    plain, cfg = tmp_path / "plain.pt", tmp_path / "run.yaml"
    torch.save(c["model"], plain)
    cfg.write_text(dump(from_dict(c["config"])))
    root, out = _val_only(folder, tmp_path / "v"), tmp_path / "w.json"
    assert eval_cli.main(["--weights", str(plain), "--arch", "resnet20", "--config", str(cfg),
                          f"data.root={root}", "--json", str(out)]) == 0
    got, one = json.loads(out.read_text())["protocols"]["center"], multi["protocols"]["center"]
    assert (got["n"], got["top1"], got["top5"]) == (one["n"], one["top1"], one["top5"])
    err = capsys.readouterr().err
    assert f"{os.path.join(root, 'train')} not found: the labels follow the class folders" in err


def test_resume_refuses_data_whose_classes_changed(ckpt, folder, tmp_path, capsys):
    """Same number of classes, one renamed: the fc still fits, so only the stored names
    can tell that label 1 would now mean another class. Refused in one line, and the
    run's checkpoints are left as they were."""
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.dirname(os.path.dirname(ckpt)), run_dir)
    moved = tmp_path / "data"
    shutil.copytree(folder, moved)
    for split in ("train", "val"):
        os.rename(moved / split / "bee", moved / split / "bat")
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    args = _train_args(str(moved), str(run_dir))
    assert train_cli.main([a for a in args if not a.startswith("train.epochs")]
                          + ["train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its classes are not the checkpoint's 3 (missing bee; new bat)" \
        in err[0], err
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("change", ["added", "renamed", "moved"])
def test_resume_refuses_a_training_split_that_changed(ckpt, folder, tmp_path, capsys, change):
    """The checkpoint's position indexes its training split's order: a file added or renamed
    (same classes) would silently shift the epochs, their order and the schedule, so the
    resume is refused in one line, the checkpoints untouched; the same files under another
    root (a moved dataset) resume."""
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.dirname(os.path.dirname(ckpt)), run_dir)
    moved = tmp_path / "data"
    shutil.copytree(folder, moved)
    ant = moved / "train" / "ant"
    if change == "added":
        shutil.copy(ant / "00.jpg", ant / "99.jpg")
    elif change == "renamed":
        os.rename(ant / "00.jpg", ant / "99.jpg")
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    args = [a for a in _train_args(str(moved), str(run_dir)) if not a.startswith("train.epochs")]
    code = train_cli.main(args + ["train.epochs=2"])
    out, err = capsys.readouterr()
    if change == "moved":
        assert code == 0, err
        assert f"data.root: {folder} -> {moved}" in out
        assert [r["epoch"] for r in records(str(run_dir))] == [0, 1]
        return
    assert code == 2
    err = err.strip().splitlines()
    assert len(err) == 1 and "the training split (data.root" in err[0], err
    assert ("18 images then, 19 now" if change == "added" else "other files or labels") in err[0]
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("change", ["key", "split", "split-plateau", "killed-after-rename"])
def test_a_resume_that_changes_the_validation_restarts_the_best(ckpt, folder, tmp_path, capsys,
                                                              change):
    """best.pt holds the best top-1 so far; after a resume whose validation measures
    differently (a measuring key, or files added to val/) the next top-1 is not comparable
    with it: the comparison starts again, said in one note, the old best.pt kept under
    another name (here the saved best is made unbeatable, 1.0: only a restart lets the next
    epoch become best.pt). Under plateau (which decides from those errors) a changed split
    is refused, as the keys are. A kill after the renaming, before any save: the next resume
    neither rewrites best.pt as a save cut short nor resumes from the kept file."""
    moved = tmp_path / "data"
    shutil.copytree(folder, moved)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    extra = ["data.val.crop=24"] if change in ("key", "killed-after-rename") else []
    if change == "split-plateau":
        args = _train_args(str(moved), str(run_dir)) + ["schedule.name=plateau"]
        assert train_cli.main(args) == 0
    else:
        shutil.copytree(os.path.dirname(os.path.dirname(ckpt)), run_dir)
        args = _train_args(str(moved), str(run_dir))
        for name in ("last.pt", "best.pt"):
            state = torch.load(ckpts / name, weights_only=True)
            torch.save({**state, "best_top1": 1.0}, ckpts / name)
    if change.startswith("split"):
        shutil.copy(moved / "val" / "ant" / "00.jpg", moved / "val" / "ant" / "99.jpg")
    if change == "killed-after-rename":
        os.replace(ckpts / "best.pt", ckpts / "best_before_step_3.pt")
    old = torch.load(ckpts / ("best_before_step_3.pt" if change == "killed-after-rename"
                              else "best.pt"), weights_only=True)
    capsys.readouterr()
    code = train_cli.main([a for a in args if not a.startswith("train.epochs")]
                          + ["train.epochs=2", *extra])
    out, err = capsys.readouterr()
    if change == "split-plateau":
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "the validation split is not the one this run validated on (15 images then, " \
               "16 now)" in err
        return
    assert code == 0, err
    what = "validation split: 15 images then, 16 now" if change == "split" else "data.val.crop"
    assert f"note: validation changed ({what}): the best top-1 so far ({old['best_top1']:.4f} " \
           f"at epoch 0)" in out
    renamed = "(the old one is now best_before_step_3.pt)" in out
    assert renamed == (change != "killed-after-rename") and "cut short" not in out
    kept = torch.load(ckpts / "best_before_step_3.pt", weights_only=True)
    assert (kept["best_top1"], kept["global_step"]) == (1.0, 3)
    best = torch.load(ckpts / "best.pt", weights_only=True)
    assert (best["best_epoch"], best["global_step"]) == (1, 6)  # the first new validation
    assert best["best_top1"] == records(str(run_dir))[-1]["val_top1"]  # (not above 1.0)

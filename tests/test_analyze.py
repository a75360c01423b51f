"""resnet-analyze: DRL Fig. 7's response std and the blocks' ||F(x)|| / ||x||."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from resnet_train.cli import analyze as analyze_cli
from resnet_train.cli import train as train_cli
from resnet_train.models import build_model
from resnet_train.study.analyze import analyze, response_layers

from .helpers import tiny


def test_response_layers_are_each_3x3_convs_bn_in_order():
    names = [n for n, _ in response_layers(build_model("resnet20", 10, width=2))]
    assert len(names) == 19 and names[0] == "conv1"
    assert names[1:3] == ["layer1.0.bn1", "layer1.0.bn2"] and names[-1] == "layer3.2.bn2"
    # one-layer full pre-activation: no BN after the conv within a unit, so its output
    pre = [n for n, _ in response_layers(build_model("preact_resnet110_1layer", 10, width=2))]
    assert pre[1:3] == ["layer1.0.conv1", "layer1.1.conv1"]
    # two layers: conv1 is normalised by the unit's bn2, conv2 goes into the addition
    pre = [n for n, _ in response_layers(build_model("preact_resnet110", 10, width=2))]
    assert pre[1:4] == ["layer1.0.bn2", "layer1.0.conv2", "layer1.1.bn2"] and len(pre) == 109
    bott = [n for n, _ in response_layers(build_model("resnet164", 10, width=2))]
    assert bott[1] == "layer1.0.bn2"  # a bottleneck's only 3x3 conv is its second


def test_std_by_hand_and_a_zero_branch_reports_zero():
    torch.manual_seed(0)
    model = build_model("resnet8", 10, width=4).eval()
    block = model.layer1[0]
    torch.nn.init.zeros_(block.bn2.weight)  # F(x) = bn2(...) = 0 for this block
    torch.nn.init.zeros_(block.bn2.bias)
    seen = []
    h = block.bn1.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    xs = [torch.randn(5, 3, 12, 12) for _ in range(3)]
    r = analyze(model, iter(xs), images=12)  # 5 + 5 + the first 2 of the last batch
    h.remove()
    assert r["images"] == 12
    out = torch.cat(seen)  # hand: per channel over images and positions, then the mean
    assert out.shape[0] == 12
    by_hand = out.transpose(0, 1).reshape(4, -1).double().std(1, unbiased=False).mean()
    layers = {entry["name"]: entry for entry in r["layers"]}
    assert layers["layer1.0.bn1"]["std"] == pytest.approx(float(by_hand), rel=1e-6)
    assert layers["layer1.0.bn2"]["std"] == 0.0
    blocks = {b["name"]: b["f_over_x"] for b in r["blocks"]}
    assert blocks["layer1.0"] == 0.0 and blocks["layer2.0"] > 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("an") / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    return os.path.join(run_dir, "checkpoints", "last.pt")


def test_cli_writes_figure_and_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "f7.png"
    assert analyze_cli.main(["--checkpoint", checkpoint, "--checkpoint", checkpoint,
                             "--images", "40", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    got = json.loads((tmp_path / "f7.json").read_text())
    assert len(got) == 2  # the same run twice: told apart by path
    r = next(iter(got.values()))
    assert r["images"] == 40 and r["arch"] == "resnet20" and len(r["layers"]) == 19


def test_cli_user_errors_are_one_line_exit_2(checkpoint, tmp_path, capsys, monkeypatch):
    assert analyze_cli.main(["--checkpoint", str(tmp_path / "nope.pt"),
                             "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pt" in err[0]
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert analyze_cli.main(["--checkpoint", checkpoint, "--images", "8",
                             "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0]
    assert (tmp_path / "b.json").exists() and not (tmp_path / "b.png").exists()

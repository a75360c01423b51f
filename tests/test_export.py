"""resnet-export: plain / torchvision-compatible state dicts, TorchScript, ONNX (checked with
onnxruntime), the input normalisation that travels with them, and bad input (exit 2)."""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_train import __version__
from resnet_train import export as ex
from resnet_train.cli import export as export_cli
from resnet_train.config import load_config, to_dict
from resnet_train.data.prep import DevicePrep
from resnet_train.models import build_model

TINY = ["model.arch=resnet8", "model.width=4", "data.dataset=synthetic", "data.image_size=16"]
# not the synthetic set's defaults (0.5, 0.29): the sidecar must hold the checkpoint's values
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _randomize_bn(model, seed):
    """Non-trivial BN statistics, so a wrong normalisation or layer order shows in outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)


def _checkpoint(path, overrides, normalization, seed=0, classes=None):
    """A checkpoint as checkpoint.load expects one (model, config, normalization)."""
    cfg = load_config(None, overrides, paths=False)
    m = cfg.model
    model = build_model(m.arch, 10, width=m.width, variant=m.variant)
    _randomize_bn(model, seed)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg),
                "normalization": normalization, "epoch": 7, "classes": classes}, path)
    return str(path)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    channel = {"normalize": "channel", "mean": torch.tensor(MEAN), "std": torch.tensor(STD)}
    # the ResNet paper's CIFAR recipe: a per-pixel mean image and no std division; 20x20
    # against a 16 px input, as a folder run's train-crop mean meets its val crop
    pixel = {"normalize": "pixel_mean", "std": None,
             "mean": torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(5))}
    return {
        "tiny": _checkpoint(d / "tiny.pt", TINY, channel,
                            classes=[f"class_{k}" for k in range(10)]),
        "pixel": _checkpoint(d / "pixel.pt", [*TINY, "data.normalize=pixel_mean",
                                              "data.divide_std=false"], pixel, seed=1),
        "r18": _checkpoint(d / "r18.pt", ["model.arch=resnet18", "data.dataset=synthetic",
                                          "data.image_size=32"], channel, seed=2),
    }


def _ours(path):
    """Our network as the checkpoint holds it (eval mode) and the checkpoint."""
    ckpt = torch.load(path, weights_only=True)
    cfg = load_config(None, [], base=ckpt["config"], paths=False)
    model = build_model(cfg.model.arch, 10, width=cfg.model.width, variant=cfg.model.variant)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def _uint8(n, size, seed=3):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _run(capsys, *args):
    capsys.readouterr()
    code = export_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _sidecar(out):
    with open(f"{out}.json", encoding="utf-8") as fh:
        return json.load(fh)


def test_state_dict_is_plain_and_torchvision_resnet18_reproduces_it(ckpts, tmp_path, capsys):
    import torchvision
    out = tmp_path / "r18.pth"
    code, stdout, err = _run(capsys, "--checkpoint", ckpts["r18"], "--format", "state_dict",
                             "--out", out)
    assert code == 0, err
    sd = torch.load(out, weights_only=True)
    ours, ckpt = _ours(ckpts["r18"])
    assert type(sd) is dict and list(sd) == list(ckpt["model"])  # no wrapper, no module.
    assert all(torch.equal(sd[k], ckpt["model"][k]) for k in sd)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tv(x), ours(x), atol=1e-5, rtol=1e-5)
    assert "torchvision-compatible: torchvision.models.resnet18(num_classes=10)" in stdout
    meta = _sidecar(out)
    assert meta["torchvision"] == "torchvision.models.resnet18(num_classes=10)"
    assert meta["normalization"]["included_in_model"] is False


def test_cifar_state_dict_is_our_layout_only_and_the_sidecar_holds_its_values(
        ckpts, tmp_path, capsys):
    out = tmp_path / "tiny.pth"
    code, stdout, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format", "state_dict",
                             "--out", out)
    assert code == 0, err
    assert "our layout only (torchvision has no resnet8)" in stdout
    assert "build_model('resnet8', 10, width=4)" in stdout
    meta = _sidecar(out)
    assert meta["torchvision"] is None and meta["arch"] == "resnet8"
    assert meta["num_classes"] == 10 and meta["model_options"] == {"width": 4}
    assert meta["input"]["size"] == [16, 16] and meta["epoch"] == 7
    norm = meta["normalization"]
    # exactly the checkpoint's float32 values, not the dataset defaults
    assert torch.equal(torch.tensor(norm["mean"]), torch.tensor(MEAN))
    assert torch.equal(torch.tensor(norm["std"]), torch.tensor(STD))
    assert not os.path.exists(f"{out}.mean.npy")


def test_torchvision_match_tries_the_outputs_not_only_the_keys():
    # variant v1 has torchvision's keys and shapes, but strides in the 1x1 conv
    v1 = build_model("resnet50", 10, variant="v1").eval()
    call, why = ex.torchvision_match(v1, "resnet50", 10)
    assert call is None and "takes the keys but computes another network" in why
    call, why = ex.torchvision_match(build_model("resnet18", 10, shortcut="A").eval(),
                                     "resnet18", 10)
    assert call is None and "keys missing" in why and "downsample" in why


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_includes_the_normalisation_and_reproduces_the_model(
        ckpts, tmp_path, capsys):
    out = tmp_path / "tiny.pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format",
                                 "torchscript", "--out", out)
    assert code == 0, err
    assert [str(w.message) for w in caught] == [] and err == ""  # clean output
    extra = {ex.SIDECAR_KEY: ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[ex.SIDECAR_KEY]) == _sidecar(out)
    ours, _ = _ours(ckpts["tiny"])
    u8 = _uint8(5, 16)  # another batch size than the trace's
    with torch.no_grad():
        reference = ours(DevicePrep(MEAN, STD)(u8))  # the run's own validation prep
        torch.testing.assert_close(loaded(u8 / 255.0), reference, atol=1e-5, rtol=1e-5)
    assert "normalisation included" in stdout and _sidecar(out)["input"]["range"] == [0, 1]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_no_normalize_is_the_bare_network(ckpts, tmp_path, capsys):
    out = tmp_path / "bare.pt"
    code, _, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format", "torchscript",
                        "--out", out, "--no-normalize")
    assert code == 0, err
    ours, _ = _ours(ckpts["tiny"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(x), ours(x), atol=1e-5, rtol=1e-5)
    assert _sidecar(out)["normalization"]["included_in_model"] is False


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_per_pixel_mean_image_travels_in_the_graph_and_beside_it(ckpts, tmp_path, capsys):
    out = tmp_path / "pixel.pt"
    code, _, err = _run(capsys, "--checkpoint", ckpts["pixel"], "--format", "torchscript",
                        "--out", out)
    assert code == 0, err
    ours, ckpt = _ours(ckpts["pixel"])
    mean20 = ckpt["normalization"]["mean"]
    meta = _sidecar(out)["normalization"]
    assert meta["mean"] is None and meta["std"] == [1.0, 1.0, 1.0]  # no std division
    assert meta["mean_image"] == "pixel.pt.mean.npy" and meta["mean_image_shape"] == [3, 16, 16]
    # the mean at the input size, resized as the validation prep resizes it
    image = torch.from_numpy(np.load(f"{out}.mean.npy"))
    expected = F.interpolate(mean20[None], size=(16, 16), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    torch.testing.assert_close(image, expected, atol=1e-7, rtol=0)
    u8 = _uint8(4, 16)
    with torch.no_grad():
        reference = ours(DevicePrep(mean20, None)(u8))
        torch.testing.assert_close(torch.jit.load(str(out))(u8 / 255.0), reference,
                                   atol=1e-5, rtol=1e-5)


def test_folder_run_sidecar_names_the_resize_and_crop(ckpts, tmp_path, capsys):
    out = tmp_path / "folder.pth"
    code, _, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format", "state_dict",
                        "--out", out, "data.dataset=folder", "data.root=/nowhere",
                        "data.val.resize=20", "data.val.crop=18")
    assert code == 0, err
    meta = _sidecar(out)
    assert meta["classes"] == [f"class_{k}" for k in range(10)]  # the checkpoint's, by index
    assert meta["input"]["size"] == [18, 18]
    assert meta["preprocessing"]["resize"] == 20 and meta["preprocessing"]["crop"] == 18


def test_onnx_runs_in_onnxruntime_with_a_dynamic_batch_and_metadata(ckpts, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "tiny.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format", "onnx",
                                 "--out", out)
    assert code == 0, err
    assert [str(w.message) for w in caught] == [] and err == ""
    assert "onnxruntime reproduces it" in stdout and "dynamic batch" in stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic batch dimension
    ours, _ = _ours(ckpts["tiny"])
    for n in (1, 5):
        u8 = _uint8(n, 16, seed=n)
        got = torch.from_numpy(session.run(None, {"input": (u8 / 255.0).numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, ours(DevicePrep(MEAN, STD)(u8)), atol=1e-4,
                                       rtol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[ex.SIDECAR_KEY]) == _sidecar(out)


def test_onnx_that_does_not_reproduce_the_model_fails_loudly(ckpts, tmp_path, capsys,
                                                            monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    monkeypatch.setitem(ex.TOLERANCE, "onnx", (-1.0, 0.0))  # no output can pass
    out = tmp_path / "bad.onnx"
    code, _, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format", "onnx",
                        "--out", out)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not reproduce the network" in err and "nothing was written" in err
    assert not os.path.exists(out) and os.listdir(tmp_path) == []


@pytest.mark.parametrize("module", ["onnx", "onnxruntime", "onnxscript"])
def test_missing_onnx_extra_is_one_line_exit_2(ckpts, tmp_path, capsys, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    out = tmp_path / "m.onnx"
    code, _, err = _run(capsys, "--checkpoint", ckpts["tiny"], "--format", "onnx",
                        "--out", out)
    assert code == 2
    assert err == ('resnet-export: error: --format onnx needs the [onnx] extra: '
                   'pip install "resnet-train[onnx]"\n')
    assert not os.path.exists(out)


def test_bad_input_is_one_line_exit_2(ckpts, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not a zip at all")
    cases = [
        (["--checkpoint", tmp_path / "missing.pt"], "checkpoint not found", "missing.pt"),
        (["--checkpoint", corrupt], "not a readable checkpoint", "corrupt.pt"),
        (["--checkpoint", ckpts["tiny"], "--out", tmp_path / "nodir" / "m.pt"],
         "does not exist", "nodir"),
        (["--checkpoint", ckpts["tiny"], "--out", tmp_path], "is a directory", str(tmp_path)),
    ]
    for args, what, culprit in cases:
        argv = ["--format", "state_dict", "--out", tmp_path / "m.pt", *args]
        code, _, err = _run(capsys, *argv)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("resnet-export: error: ") and what in err and culprit in err
    assert sorted(os.listdir(tmp_path)) == ["corrupt.pt"]  # nothing written


def test_unknown_format_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--checkpoint", "x.pt", "--format", "tflite", "--out", "m"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"resnet-export {__version__}\n"
    assert export_cli.FORMATS == ex.FORMATS

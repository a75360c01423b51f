"""resnet-export: a checkpoint's network as a plain state dict, TorchScript or ONNX.

The input normalisation travels with the model. TorchScript and ONNX graphs take float RGB
in [0, 1], (N, 3, H, W), and apply the run's ``(x - mean) / std`` themselves (the per-pixel
mean image too) unless ``normalize=False`` exports the bare network; a state dict is always
the bare network. Every format gets a JSON sidecar ``FILE.json`` (mean, std, input size,
classes, arch, the validation preprocessing); a per-pixel mean image is also written as
``FILE.mean.npy``, and ONNX models carry the sidecar in their ``metadata_props``.

Each written graph is checked before it replaces ``FILE``: reloaded (TorchScript) or run by
onnxruntime (ONNX) on a batch of another size than the one traced, against the model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import __version__
from . import checkpoint as ckpt_io
from .config import Config, load_config
from .errors import CheckpointError, ResnetTrainError, UserError
from .rundir import atomic_write

FORMATS = ("state_dict", "torchscript", "onnx")
ONNX_EXTRA = ("onnx", "onnxruntime", "onnxscript")  # exporter (dynamo) needs onnxscript
SIDECAR_KEY = "resnet_train.export"  # the sidecar's name in ONNX metadata / TorchScript files
# |ours - theirs| <= atol + rtol |ours|: trained logits reach tens, where fp32 kernels that
# sum in another order differ by ~1e-6 of the value.
TOLERANCE = {"torchscript": (1e-5, 1e-5), "onnx": (1e-4, 1e-4), "torchvision": (1e-4, 1e-4)}
BUILD_OPTIONS = ("variant", "shortcut", "unit", "zero_init_residual", "width", "shortcut_variant")
EXAMPLE_BATCH, CHECK_BATCH = 2, 3  # torch.export specialises a batch of 1: trace at 2


class ExportCheckFailed(ResnetTrainError):
    """The written model does not reproduce ours: an exporter bug, not the user's; exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Source:
    """What an export needs from a checkpoint: the eval-mode CPU fp32 network and its input."""

    path: str
    cfg: Config
    model: nn.Module
    num_classes: int
    normalize: str  # "channel" or "pixel_mean"
    mean: Tensor  # (3,), or the (3, H, W) mean image at the input size
    std: Tensor  # (3,); ones when the run did not divide by the std
    input_size: tuple[int, int]  # (H, W) the validation fed the network
    preprocessing: dict
    epoch: int | None
    classes: list[str] | None = None  # the training data's class names, by output index


def _as_is(size: Callable[[Config], int]) -> Callable[[Config], tuple[int, dict]]:
    """A dataset whose images the network sees at one size, as they are."""
    def inputs(cfg: Config) -> tuple[int, dict]:
        side = size(cfg)
        return side, {"resize": None, "crop": None, "note": f"the {side}x{side} image as it is"}
    return inputs


def _folder_input(cfg: Config) -> tuple[int, dict]:
    v = cfg.data.val
    return v.crop, {"resize": v.resize, "crop": v.crop, "interpolation": "bilinear, antialiased",
                    "note": f"short side resized to {v.resize} (PIL's bilinear filter, as "
                            f"torchvision's Resize), then the centre {v.crop}x{v.crop} crop"}


# data.dataset -> (input side, the validation's preprocessing before normalisation)
INPUTS: dict[str, Callable[[Config], tuple[int, dict]]] = {
    "synthetic": _as_is(lambda cfg: cfg.data.image_size),
    "synthetic_imagenet": _as_is(lambda cfg: cfg.data.train.crop),
    "cifar10": _as_is(lambda cfg: 32),
    "cifar100": _as_is(lambda cfg: 32),
    "imagenet": _folder_input,
    "folder": _folder_input,
}


def require_onnx() -> None:
    """UserError (exit 2) unless the [onnx] extra is importable."""
    for name in ONNX_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError('--format onnx needs the [onnx] extra: '
                            'pip install "resnet-train[onnx]"') from None


def check_out(out: str) -> None:
    """UserError naming ``out`` when it cannot be a file path: checked before any work."""
    directory = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise UserError(f"--out {out}: is a directory; give a file name")
    if not os.path.isdir(directory):
        raise UserError(f"--out {out}: directory {directory} does not exist")


def _normalization(ckpt: dict, path: str) -> tuple[str, Tensor, Tensor]:
    norm = ckpt.get("normalization")
    if not isinstance(norm, dict) or "mean" not in norm:
        raise CheckpointError(f"{path}: no 'normalization' entry; the input normalisation "
                              f"cannot be exported")
    mean = torch.as_tensor(norm["mean"], dtype=torch.float32)
    std = (torch.ones(3) if norm.get("std") is None
           else torch.as_tensor(norm["std"], dtype=torch.float32).flatten())
    return str(norm.get("normalize", "channel")), mean, std


def _mean_at(mean: Tensor, size: tuple[int, int]) -> Tensor:
    """The mean at the input size: a mean image of another size is resized as DevicePrep
    resizes it for such batches (bilinear, antialiased)."""
    if mean.dim() == 1 or tuple(mean.shape[-2:]) == size:
        return mean
    return nn.functional.interpolate(mean.unsqueeze(0), size=size, mode="bilinear",
                                     align_corners=False, antialias=True)[0]


def load_source(path: str, config: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Source:
    """The checkpoint's network (eval, CPU, fp32, NCHW) rebuilt from its stored config with
    ``config`` and ``overrides`` on top, and its input normalisation and size."""
    from .runtime import Runtime, build_model_for
    ckpt = ckpt_io.load(path)
    state = ckpt["model"]
    if not isinstance(state, dict) or not isinstance(state.get("fc.weight"), Tensor):
        raise CheckpointError(f"{path}: the model has no fc.weight; not a ResNet of ours")
    num_classes = int(state["fc.weight"].shape[0])
    # The data need not be here: only the model and the input size are rebuilt.
    cfg = load_config(config, overrides, base=ckpt.get("config") or {}, paths=False)
    model = build_model_for(cfg, num_classes, Runtime(torch.device("cpu"), None, False))
    ckpt_io.check_fits(model, state, path)
    model.load_state_dict(state)
    model.float().eval()
    normalize, mean, std = _normalization(ckpt, path)
    side, preprocessing = INPUTS[cfg.data.dataset](cfg)
    size = (side, side)
    return Source(path, cfg, model, num_classes, normalize, _mean_at(mean, size), std, size,
                  # one view an image (ten_crop / multiscale average several such views)
                  {"dataset": cfg.data.dataset, "protocol": "center", **preprocessing},
                  ckpt.get("epoch"), ckpt.get("classes"))


class Normalized(nn.Module):
    """Float RGB in [0, 1], (N, 3, H, W) -> logits: the run's normalisation, then the net.

    A (3, H, W) mean image fixes the input size to (H, W)."""

    def __init__(self, net: nn.Module, mean: Tensor, std: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.view(1, 3, 1, 1) if mean.dim() == 1
                             else mean.unsqueeze(0))
        self.register_buffer("std", std.view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def _example(src: Source, batch: int, normalized: bool, seed: int = 0) -> Tensor:
    """A batch like the graph's input: [0, 1] pixels, or already-normalised ones."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, *src.input_size)
    return torch.rand(shape, generator=gen) if normalized else torch.randn(shape, generator=gen)


def _difference(ours: Tensor, theirs: Tensor, kind: str) -> tuple[float, bool]:
    """(max |ours - theirs|, within TOLERANCE[kind])."""
    atol, rtol = TOLERANCE[kind]
    diff = (ours - theirs).abs()
    return float(diff.max()), bool((diff <= atol + rtol * ours.abs()).all())


def _write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
    atomic_write(path, write)


def _write_npy(path: str, array: Tensor) -> None:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array.numpy())
    atomic_write(path, write)


@contextlib.contextmanager
def quiet_jit():
    """torch.jit's deprecation notices (torch 2.9+; a FutureWarning in some releases, a
    DeprecationWarning in others) off: TorchScript works and is what this format is; any
    other warning (a TracerWarning: the trace may be wrong) still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
        yield


def _floats(t: Tensor) -> list[float]:
    """float32 values as the shortest decimals that read back as the same float32."""
    import numpy as np
    return [float(np.format_float_positional(np.float32(v), unique=True)) for v in t.tolist()]


def _sidecar(src: Source, fmt: str, out: str, normalized: bool) -> dict:
    """What a user needs to feed the exported model (and to rebuild it with our builder)."""
    m = src.cfg.model
    # build_model's options that the config sets (None / False: the arch's default)
    options = {k: getattr(m, k) for k in BUILD_OPTIONS if getattr(m, k) not in (None, False)}
    h, w = src.input_size
    norm = {"included_in_model": normalized, "normalize": src.normalize,
            "formula": "(x - mean) / std, x = RGB in [0, 1] (uint8 / 255)",
            "std": _floats(src.std)}  # ones when the run did not divide by the std
    if src.mean.dim() == 1:
        norm["mean"] = _floats(src.mean)
    else:
        norm["mean"] = None
        norm["mean_image"] = os.path.basename(out) + ".mean.npy"
        norm["mean_image_shape"] = list(src.mean.shape)
    return {
        "format": fmt, "file": os.path.basename(out), "arch": m.arch, "model_options": options,
        "num_classes": src.num_classes, "classes": src.classes,
        "input": {"layout": "NCHW", "channels": "RGB", "dtype": "float32",
                  "range": [0, 1] if normalized else "normalised (see normalization)",
                  "size": [h, w], "size_fixed": fmt == "onnx" or (normalized and
                                                                  src.mean.dim() == 3),
                  "batch": "dynamic"},
        "output": "logits (N, num_classes); softmax gives the class probabilities",
        "normalization": norm, "preprocessing": src.preprocessing,
        "checkpoint": os.path.abspath(src.path), "epoch": src.epoch,
        "resnet_train_version": __version__,
    }


def torchvision_match(model: nn.Module, arch: str, num_classes: int) -> tuple[str | None, str]:
    """(torchvision's constructor call that takes this state dict strictly and computes the
    same outputs, "") or (None, why not). Decided by trying, not by a list: the same keys
    can compute another network (e.g. variant v1 puts the stride in the 1x1 conv)."""
    import torchvision
    build = getattr(torchvision.models, arch, None)
    if not callable(build):
        return None, f"torchvision has no {arch}"
    try:
        theirs = build(weights=None, num_classes=num_classes).eval()
    except Exception as e:  # not a ResNet-like builder after all
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return None, f"torchvision.models.{arch}(num_classes={num_classes}) fails ({reason})"
    ours_sd, theirs_sd = model.state_dict(), theirs.state_dict()
    missing, extra = sorted(set(theirs_sd) - set(ours_sd)), sorted(set(ours_sd) - set(theirs_sd))
    if missing or extra:
        first = (missing or extra)[0]
        return None, (f"{len(missing)} keys missing, {len(extra)} unexpected for torchvision's "
                      f"{arch} (e.g. {first})")
    shapes = [k for k in ours_sd if ours_sd[k].shape != theirs_sd[k].shape]
    if shapes:
        k = shapes[0]
        return None, (f"{len(shapes)} shapes differ from torchvision's {arch} (e.g. {k} "
                      f"{tuple(ours_sd[k].shape)} vs {tuple(theirs_sd[k].shape)})")
    theirs.load_state_dict(ours_sd, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff, ok = _difference(model(x), theirs(x), "torchvision")
    if not ok:
        return None, (f"torchvision's {arch} takes the keys but computes another network "
                      f"(max |diff| {diff:.2g}: another stride placement or unit order)")
    return f"torchvision.models.{arch}(num_classes={num_classes})", ""


def _export_state_dict(src: Source, module: nn.Module, out: str, meta: dict) -> str:
    state = {k: v.detach().clone() for k, v in src.model.state_dict().items()}
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    call, why = torchvision_match(src.model, src.cfg.model.arch, src.num_classes)
    meta["torchvision"] = call
    if call is not None:
        return (f"wrote {out}: plain state dict, torchvision-compatible: {call}"
                f".load_state_dict(torch.load({os.path.basename(out)!r}, weights_only=True)) "
                f"(strict) computes the same outputs")
    meta["torchvision_reason"] = why
    options = "".join(f", {k}={v!r}" for k, v in meta["model_options"].items())
    return (f"wrote {out}: plain state dict in our layout only ({why}); rebuild with "
            f"resnet_train.models.build_model({src.cfg.model.arch!r}, {src.num_classes}"
            f"{options})")


def _export_torchscript(src: Source, module: nn.Module, out: str, meta: dict) -> str:
    normalized = isinstance(module, Normalized)
    extra = {SIDECAR_KEY: json.dumps(meta)}

    def write(tmp: str) -> None:
        with quiet_jit(), torch.no_grad():
            traced = torch.jit.trace(module, _example(src, EXAMPLE_BATCH, normalized),
                                     check_trace=False)  # checked below, on the file
            torch.jit.save(traced, tmp, _extra_files=extra)
            loaded = torch.jit.load(tmp, map_location="cpu")
        _check(src, module, lambda x: loaded(x), "torchscript", normalized)
    atomic_write(out, write)
    return f"wrote {out}: TorchScript (torch.jit.trace), {_input_words(src, normalized)}"


def _check(src: Source, module: nn.Module, run: Callable[[Tensor], Tensor], kind: str,
           normalized: bool) -> float:
    """ExportCheckFailed unless ``run`` (the written model) reproduces ``module``."""
    x = _example(src, CHECK_BATCH, normalized, seed=1)
    with torch.no_grad():
        diff, ok = _difference(module(x), run(x), kind)
    if not ok:
        atol, rtol = TOLERANCE[kind]
        raise ExportCheckFailed(f"the exported {kind} model does not reproduce the network "
                                f"(max |diff| {diff:.3g} > {atol:g} + {rtol:g}|out| on a batch "
                                f"of {CHECK_BATCH}); nothing was written. An exporter bug: "
                                f"please report it")
    return diff


def _input_words(src: Source, normalized: bool) -> str:
    h, w = src.input_size
    if normalized:
        return f"input float RGB in [0, 1] (N, 3, {h}, {w}), normalisation included"
    return f"input already normalised (N, 3, {h}, {w}), normalisation NOT included"


def _export_onnx(src: Source, module: nn.Module, out: str, meta: dict) -> str:
    import onnxruntime
    from torch.export import Dim
    normalized = isinstance(module, Normalized)
    example = _example(src, EXAMPLE_BATCH, normalized)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.11's exporter trips over its own pytree deprecation (nothing a user can
            # act on); any other warning still shows
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`")
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False,
                                        input_names=["input"], output_names=["logits"],
                                        dynamic_shapes=({0: Dim("batch")},))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ExportCheckFailed(f"torch.onnx.export failed on {src.cfg.model.arch} ({reason});"
                                f" an exporter bug: please report it") from e
    program.model.metadata_props[SIDECAR_KEY] = json.dumps(meta)
    diffs = []

    def write(tmp: str) -> None:
        program.save(tmp, external_data=False)
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])

        def run(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        diffs.append(_check(src, module, run, "onnx", normalized))
    atomic_write(out, write)
    return (f"wrote {out}: ONNX (opset {program.model.opset_imports['']}, dynamic batch), "
            f"{_input_words(src, normalized)}; onnxruntime reproduces it "
            f"(max |diff| {diffs[0]:.2g} on a batch of {CHECK_BATCH})")


EXPORTERS = {"state_dict": _export_state_dict, "torchscript": _export_torchscript,
             "onnx": _export_onnx}


def export(path: str, fmt: str, out: str, config: str | None = None,
           overrides: list[str] | tuple[str, ...] = (), normalize: bool = True,
           say: Callable[[str], None] = print) -> dict:
    """Export checkpoint ``path`` as ``fmt`` to ``out`` plus ``out``.json; return the sidecar.

    ``normalize``: TorchScript / ONNX graphs include the input normalisation (float RGB in
    [0, 1] in); a state dict is always the bare network."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    check_out(out)
    src = load_source(path, config, overrides)
    normalized = normalize and fmt != "state_dict"
    module = Normalized(src.model, src.mean, src.std).eval() if normalized else src.model
    meta = _sidecar(src, fmt, out, normalized)
    say(EXPORTERS[fmt](src, module, out, meta))  # checked before it is written
    if src.mean.dim() == 3:
        _write_npy(out + ".mean.npy", src.mean)
    _write_json(out + ".json", meta)
    say(f"wrote {out}.json: {_norm_words(meta['normalization'])}; "
        f"preprocessing: {src.preprocessing['note']}")
    return meta


def _norm_words(norm: dict) -> str:
    mean = norm["mean"] if norm["mean"] is not None else f"the image {norm['mean_image']}"
    return (f"{norm['formula']}, mean {mean}, std {norm['std']}"
            f"{' (in the model)' if norm['included_in_model'] else ' (apply it yourself)'}")


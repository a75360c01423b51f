"""resnet-export --checkpoint PATH --format state_dict|torchscript|onnx --out FILE
[--config C] [--no-normalize] [key=value ...] [--version]"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import run_main

FORMATS = ("state_dict", "torchscript", "onnx")  # resnet_train.export.FORMATS, kept import-free

DESCRIPTION = """Export a checkpoint's network for inference.

  state_dict   a plain {name: tensor} file (torch.load(FILE, weights_only=True)), the bare
               network; says whether torchvision's constructor of the arch takes it strictly
               and computes the same outputs (ImageNet resnet18..152, v1.5, shortcut B)
  torchscript  torch.jit.trace of the eval-mode model; torch.jit.load(FILE)(x)
  onnx         torch.onnx.export (dynamo), dynamic batch, checked with onnxruntime;
               needs the [onnx] extra: pip install "resnet-train[onnx]"

TorchScript and ONNX models take float RGB in [0, 1], (N, 3, H, W), and normalise it as the
training run did (its mean, or per-pixel mean image, and std); --no-normalize exports the
bare network instead. FILE.json (every format) holds the mean, std, input size, class count,
arch and the validation preprocessing (resize / crop); a per-pixel mean image is also
written to FILE.mean.npy. The model is rebuilt from the checkpoint's stored config; --config
and key=value overrides apply on top (e.g. data.val.crop=256 for another input size).

Exit codes: 0 done, 1 the written model failed its check (an exporter bug), 2 user error
(missing or unusable checkpoint, missing [onnx] extra, --out in no existing directory),
4 the file could not be written.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (e.g. .../best.pt)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, metavar="FILE", help="output file")
    p.add_argument("--config", help="YAML applied over the checkpoint's stored config")
    p.add_argument("--no-normalize", action="store_true",
                   help="torchscript/onnx: export the bare network (input already normalised)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from ..export import export
        export(args.checkpoint, args.format, args.out, args.config, args.overrides,
               normalize=not args.no_normalize)
        return 0

    return run_main("resnet-export", body)


if __name__ == "__main__":
    sys.exit(main())

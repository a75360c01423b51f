"""resnet-analyze --checkpoint PATH [--checkpoint PATH ...] [--images N] [--out F.png] [--json F]"""

from __future__ import annotations

import argparse
import os
import sys

from . import run_main, write_json

DESCRIPTION = """Residual-learning diagnostics of trained checkpoints (He et al. 2015, Fig. 7).

For each checkpoint, over N validation images (centre crops, eval mode): the standard
deviation of every 3x3 layer's responses (after its BN, before the addition and the ReLU),
in network order and sorted by magnitude, and every residual block's ||F(x)|| / ||x||.
Several checkpoints overlay in one figure (plain vs ResNet, depths). Writes the figure
(--out, PNG or SVG; needs matplotlib) and the numbers (--json).

Exit codes: 0 done, 2 user error (missing or unusable checkpoint, matplotlib missing).
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-analyze", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="a checkpoint (repeat to overlay)")
    p.add_argument("--images", type=int, default=1000, help="validation images (default 1000)")
    p.add_argument("--out", default="fig7.png", help="figure (.png or .svg; default fig7.png)")
    p.add_argument("--json", default=None, help="numbers (default: the figure's name, .json)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (e.g. data.root=... where the data moved)")
    return p


def analyze_checkpoint(path: str, images: int, overrides=()) -> dict:
    from .. import checkpoint as ckpt_io
    from ..config import load_config
    from ..data import build_data
    from ..errors import UserError
    from ..runtime import build_model_for, resolve_runtime
    from ..study.analyze import analyze
    if images < 1:
        raise UserError(f"--images {images}: at least one image")
    ckpt = ckpt_io.load(path)
    cfg = load_config(None, ["data.val.protocol=center", "data.val.final_protocol=same",
                             *overrides], base=ckpt.get("config") or {})
    runtime = resolve_runtime(cfg, 0)
    data = build_data(cfg, runtime.device, 0, 1, norm=ckpt.get("normalization"))
    model = build_model_for(cfg, data.num_classes, runtime)
    ckpt_io.check_fits(model, ckpt["model"], path)
    model.load_state_dict(ckpt["model"])
    batches = data.val.batches(0, 0)
    try:
        inputs = (runtime.layout(data.val_prep(x.to(runtime.device))) for x, _ in batches)
        result = analyze(model.float(), inputs, images)
    finally:
        if hasattr(batches, "close"):
            batches.close()
        data.train.close()
        data.val.close()
    result.update(checkpoint=os.path.abspath(path), arch=cfg.model.arch, run=cfg.run.name)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        from ..study.analyze import draw
        from ..study.plot import MatplotlibMissing, check_out
        check_out(args.out)
        results = {}
        for path in args.checkpoint:
            r = analyze_checkpoint(path, args.images, args.overrides)
            label = r["run"] if r["run"] not in (None, "run") else r["arch"]
            results[label if label not in results else f"{label} ({path})"] = r
        out_json = args.json or os.path.splitext(args.out)[0] + ".json"
        write_json(out_json, results)
        try:
            draw(args.out, results)
        except MatplotlibMissing as e:
            print(f"resnet-analyze: {e} (the JSON was still written: {out_json})",
                  file=sys.stderr)
            return e.exit_code
        print(f"wrote {args.out} and {out_json}")
        return 0

    return run_main("resnet-analyze", body)


if __name__ == "__main__":
    sys.exit(main())

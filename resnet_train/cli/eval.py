"""resnet-eval --checkpoint PATH [--config C] [key=value ...] [--json OUT]"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import run_main

DESCRIPTION = """Evaluate a checkpoint on the validation split of its dataset.

The model and data are rebuilt from the config stored in the checkpoint; --config and
key=value overrides are applied on top (e.g. data.root=/other/place). Prints loss, top-1,
top-5 and N; --json writes them to a file. Exit codes as resnet-train.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-eval", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (e.g. .../best.pt)")
    p.add_argument("--config", help="YAML applied over the checkpoint's stored config")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def evaluate_checkpoint(path: str, config: str | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Rebuild model and data from a checkpoint; return loss, top1, top5, n (all ranks)."""
    import torch

    from .. import checkpoint as ckpt_io
    from .. import distributed as dist_utils
    from ..config import load_config
    from ..data import build_data
    from ..engine import evaluate, view_scorer
    from ..models import build_model
    from ..trainer import resolve_amp, resolve_channels_last, resolve_device

    ckpt = ckpt_io.load(path)
    cfg = load_config(config, overrides, base=ckpt.get("config") or {})
    kind = cfg.run.device if cfg.run.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    info = dist_utils.init(kind)
    try:
        device = resolve_device(cfg.run.device, info.local_rank)
        amp = resolve_amp(cfg.train.amp, device)
        channels_last = resolve_channels_last(cfg.train.channels_last, device, amp)
        data = build_data(cfg, device, info.rank, info.world)
        m = cfg.model
        model = build_model(m.arch, data.num_classes, variant=m.variant, shortcut=m.shortcut,
                            unit=m.unit, zero_init_residual=m.zero_init_residual, width=m.width)
        ckpt_io.check_fits(model, ckpt["model"], path)
        model.load_state_dict(ckpt["model"])
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        v = cfg.data.val
        result = evaluate(model, data.val, data.val_prep, device, amp, channels_last, info,
                          views=view_scorer(v.protocol, v.crop, v.scales, v.flip))
        result["protocol"] = v.protocol
        data.train.close()
        data.val.close()
        result["checkpoint"] = os.path.abspath(path)
        result["epoch"] = ckpt.get("epoch")
        return result
    finally:
        dist_utils.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        r = evaluate_checkpoint(args.checkpoint, args.config, args.overrides)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
            return 0
        print(f"loss {r['loss']:.4f}  top1 {r['top1']:.4f}  top5 {r['top5']:.4f}  n {r['n']}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(r, fh, indent=2)
                fh.write("\n")
        return 0

    return run_main("resnet-eval", body)


if __name__ == "__main__":
    sys.exit(main())

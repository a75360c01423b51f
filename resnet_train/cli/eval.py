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
    from .. import checkpoint as ckpt_io
    from .. import distributed as dist_utils
    from ..config import load_config
    from ..data import build_data
    from ..engine import evaluate, scorer_for
    from ..runtime import build_model_for, device_kind, resolve_runtime

    ckpt = ckpt_io.load(path)
    cfg = load_config(config, overrides, base=ckpt.get("config") or {})
    info = dist_utils.init(device_kind(cfg.run.device))
    model = None
    try:
        runtime = resolve_runtime(cfg, info.local_rank)
        data = build_data(cfg, runtime.device, info.rank, info.world,
                          norm=ckpt.get("normalization"))  # the training run's mean
        model = build_model_for(cfg, data.num_classes, runtime)
        ckpt_io.check_fits(model, ckpt["model"], path)
        model.load_state_dict(ckpt["model"])
        try:
            result = evaluate(model, data.val, data.val_prep, runtime, info,
                              views=scorer_for(cfg.data.val))
        finally:
            data.train.close()
            data.val.close()
        result["protocol"] = cfg.data.val.protocol
        result["checkpoint"] = os.path.abspath(path)
        result["epoch"] = ckpt.get("epoch")
        return result
    finally:
        del model  # before the process group goes (see Trainer._release)
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

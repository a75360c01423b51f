"""resnet-eval: score a checkpoint (or a plain state dict) under one or more test protocols.

    resnet-eval --checkpoint PATH [--config C] [key=value ...] [--protocol P ...]
                [--per-class] [--json OUT]
    resnet-eval --weights SPEC --arch ARCH --config C [--from native|akamaster] [...]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

from .. import __version__
from ..config import Config, ModelConfig, ValAugConfig
from ..errors import ConfigError, UserError
from . import run_main, write_json

if typing.TYPE_CHECKING:  # torch is imported when a command runs, not for --help / --version
    from torch import nn

DESCRIPTION = """Score a model on the validation split of its dataset.

--checkpoint: one of our checkpoints. The model and data are rebuilt from the config stored
in it, with --config and key=value overrides on top (e.g. data.root=/other/place); the
normalisation is the training run's (stored in the checkpoint, never recomputed).

--weights: a plain state dict (a file, or torchvision:NAME, e.g. torchvision:IMAGENET1K_V1)
with --arch (model.arch) and --config (required: everything else, including data.mean and
data.std, which must be what the weights were trained with). --from akamaster (or the
config's model.weights_from) converts an akamaster/pytorch_resnet_cifar10 checkpoint.
data.normalize=pixel_mean is refused: the mean image is not in a state dict.

--protocol center ten_crop multiscale scores each protocol in one call (default: the
config's data.val.protocol; views other than center need an image folder / ImageNet) and
prints one table: top-1/top-5 error and accuracy (%), loss, N and images/s (the pass's wall
time). --per-class adds each class's top-1 accuracy (the 10 worst are printed) and the 10
most-confused (true -> predicted) pairs. --json writes all of it. Under torchrun every image
counts once and rank 0 alone prints and writes. Exit codes as resnet-train.
"""

# The data.val keys that define each protocol (written to --json with its numbers).
PROTOCOL_KEYS = {"center": ("resize", "crop"), "ten_crop": ("resize", "crop"),
                 "multiscale": ("scales", "flip")}
WORST, PAIRS = 10, 10  # rows of the --per-class printout (and pairs in --json)


def _choices(section, key: str) -> tuple[str, ...]:
    """The values a config key's Literal type allows: the CLI offers what the schema does."""
    return typing.get_args(typing.get_type_hints(section)[key])


PROTOCOLS = _choices(ValAugConfig, "protocol")         # data.views.EVAL_PROTOCOLS
SOURCES = _choices(ModelConfig, "weights_from")        # weights.SOURCES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnet-eval", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a resnet-train checkpoint (e.g. .../best.pt)")
    p.add_argument("--weights", metavar="SPEC",
                   help="a plain state-dict file or torchvision:NAME (needs --arch, --config)")
    p.add_argument("--arch", help="with --weights: the architecture (model.arch), e.g. resnet50")
    p.add_argument("--from", dest="source", choices=SOURCES,
                   help="with --weights: the file's layout (default: the config's "
                   "model.weights_from, native)")
    p.add_argument("--config", help="YAML: over the checkpoint's stored config, or the whole "
                   "config for --weights")
    # Validated in main, not with choices=: nargs="+" takes every word after it, and
    # key=value overrides written after the protocols belong to the overrides.
    p.add_argument("--protocol", nargs="+", metavar="P",
                   help=f"protocols to score, any of {', '.join(PROTOCOLS)} "
                   "(default: data.val.protocol)")
    p.add_argument("--per-class", action="store_true",
                   help="per-class top-1 accuracy and the most-confused class pairs")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--version", action="version", version=f"resnet-eval {__version__}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_intermixed_args(argv)
    words = args.protocol or []
    args.overrides = [*args.overrides, *(w for w in words if "=" in w)]
    args.protocol = [w for w in words if "=" not in w] or None
    for w in args.protocol or []:
        if w not in PROTOCOLS:
            p.error(f"argument --protocol: invalid choice: {w!r} "
                    f"(choose from {', '.join(PROTOCOLS)})")
    return args


# --------------------------------------------------------------------------- what is scored


@dataclass
class Subject:
    """The weights to score and the config that builds their model and data."""

    cfg: Config
    norm: dict | None                    # a checkpoint's normalization entry; None: the config's
    load: Callable[[nn.Module], None]    # puts the weights into a built model (strict)
    about: dict                          # checkpoint / weights / from / step, for the report
    classes: list[str] | None = None     # a checkpoint's class names: the labels it learned


def checkpoint_subject(path: str, config: str | None = None,
                       overrides: list[str] | tuple[str, ...] = ()) -> Subject:
    """One of our checkpoints, under its stored config with ``config`` and overrides on top."""
    from .. import checkpoint as ckpt_io
    from ..config import load_config
    ckpt = ckpt_io.load(path)
    cfg = load_config(config, overrides, base=ckpt.get("config") or {})

    def load(model) -> None:
        ckpt_io.check_fits(model, ckpt["model"], path)
        model.load_state_dict(ckpt["model"])

    about = {"checkpoint": os.path.abspath(path), "weights": None, "from": None,
             "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}
    return Subject(cfg, ckpt.get("normalization"), load, about, ckpt.get("classes"))


def weights_subject(spec: str, arch: str | None, config: str | None,
                    overrides: list[str] | tuple[str, ...] = (),
                    source: str | None = None) -> Subject:
    """A plain state dict (file or torchvision:NAME) under ``config`` with model.arch=arch."""
    from ..config import load_config
    from ..weights import (TORCHVISION, akamaster_normalization_note, check_torchvision_variant,
                           fit_weights, load_weights)
    if not arch:
        raise UserError("--weights needs --arch: a state dict does not say its architecture")
    if config is None:
        raise UserError("--weights needs --config C: a state dict holds no data or "
                        "normalisation settings (ImageNet: imagenet_torchvision_eval.yaml)")
    cfg = load_config(config, [*overrides, f"model.arch={arch}"])
    if cfg.data.normalize == "pixel_mean":
        raise ConfigError("data.normalize: pixel_mean subtracts the training run's mean image, "
                          "which a plain state dict does not hold; score its checkpoint "
                          "(--checkpoint) or set data.normalize=channel with data.mean/data.std")
    check_torchvision_variant(spec, arch, cfg.model.variant)
    source = source or cfg.model.weights_from  # a config for such weights may name the layout
    state = load_weights(spec, arch, source)
    note = akamaster_normalization_note(cfg.data) if source == "akamaster" else None
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(f"resnet-eval: {note}", file=sys.stderr)

    def load(model) -> None:
        fit_weights(model, state, spec, new_head_ok=False)  # another head size: an error here

    name = spec if spec.startswith(TORCHVISION) else os.path.abspath(spec)
    about = {"checkpoint": None, "weights": name, "from": source, "epoch": None,
             "global_step": None}
    return Subject(cfg, None, load, about)


def protocol_config(cfg, protocol: str):
    """``cfg`` with data.val.protocol = ``protocol`` (how the trainer's final pass gets its
    loader); ConfigError if the dataset cannot cut that protocol's views."""
    from ..config import replace
    from ..data import check_view_protocol
    check_view_protocol(cfg.data.dataset, protocol, f"--protocol {protocol}")
    # final_protocol: this loader is the whole pass; no second one for the trainer's last eval
    return replace(cfg, **{"data.val.protocol": protocol, "data.val.final_protocol": "same"})


# --------------------------------------------------------------------------- scoring


def score(subject: Subject, protocols: list[str] | None = None,
          per_class: bool = False) -> dict:
    """Score ``subject`` under each protocol (default: data.val.protocol) on every rank.

    The model and the data (with the subject's normalisation and class names: no walk of
    the training split) are built once; each further protocol gets a validation loader of
    its own."""
    from .. import distributed as dist_utils
    from ..data import build_data
    from ..runtime import (build_model_for, configure_host_memory, configure_threads,
                           device_kind, resolve_runtime)
    cfg = subject.cfg
    protocols = list(dict.fromkeys(protocols or [cfg.data.val.protocol]))
    cfgs = [protocol_config(cfg, p) for p in protocols]  # every refusal before any pass
    info = dist_utils.init(device_kind(cfg.run.device))
    model, results = None, {}
    try:
        runtime = resolve_runtime(cfg, info.local_rank)
        configure_threads(cfg, runtime.device)
        configure_host_memory(cfg, runtime.device)
        data = build_data(cfgs[0], runtime.device, info.rank, info.world, norm=subject.norm,
                          classes=subject.classes, eval_only=True)
        try:
            model = build_model_for(cfg, data.num_classes, runtime)
            subject.load(model)
            for i, (protocol, pcfg) in enumerate(zip(protocols, cfgs, strict=True)):
                # other protocols than the first: only folder datasets have them (refused above)
                loader = data.val if i == 0 else data.val_for(protocol)
                try:
                    results[protocol] = score_protocol(model, loader, data.val_prep, pcfg,
                                                       runtime, info, data.num_classes,
                                                       per_class)
                finally:
                    if loader is not data.val:  # its workers go before the next protocol's
                        loader.close()
        finally:
            data.close()
        return report(subject, results, data.info.get("classes"))
    finally:
        del model  # before the process group goes (see Trainer._release)
        gc.collect()
        dist_utils.shutdown()


def score_protocol(model, loader, prep, pcfg, runtime, info, num_classes: int,
                   per_class: bool) -> dict:
    """One pass over the validation split: the numbers, the wall time, the protocol's keys."""
    from .. import distributed as dist_utils
    from ..engine import evaluate, scorer_for
    val = pcfg.data.val
    start = time.perf_counter()
    r = evaluate(model, loader, prep, runtime, info, views=scorer_for(val),
                 confusion=num_classes if per_class else 0)
    seconds = time.perf_counter() - start  # evaluate ends with a read: the device is done
    bad, bad_paths = loader.bad_report()  # (data.on_bad_image=skip: not in n)
    bad = int(dist_utils.all_reduce_sum([float(bad)], runtime.device, info)[0])
    out = {"loss": r["loss"], "top1": r["top1"], "top5": r["top5"], "n": r["n"],
           "seconds": seconds, "images_per_s": r["n"] / seconds if seconds > 0 else None,
           "bad_images": bad, "bad_paths": bad_paths}
    out.update({k: getattr(val, k) for k in PROTOCOL_KEYS[val.protocol]})
    if per_class:
        out["confusion"] = r["confusion"]
    return out


def report(subject: Subject, results: dict, classes: list[str] | None) -> dict:
    """The result of a call: what was scored, each protocol's numbers (and per-class
    tables), and at the top level the first protocol's loss/top1/top5/n (as one-protocol
    resnet-eval always wrote)."""
    cfg = subject.cfg
    protocols = {}
    for name, r in results.items():
        conf = r.pop("confusion", None)
        if conf is not None:
            r.update(per_class_tables(conf, classes))
        protocols[name] = {"protocol": name, **r}
    first = next(iter(protocols.values()))
    head = {k: first[k] for k in ("protocol", "loss", "top1", "top5", "n")}
    return {**head, **subject.about, "arch": cfg.model.arch, "dataset": cfg.data.dataset,
            "protocols": protocols}


def per_class_tables(conf, classes: list[str] | None) -> dict:
    """Per-class top-1 (every class) and the most-confused pairs of a confusion matrix."""
    k = conf.shape[0]
    names = classes if classes is not None and len(classes) == k else [str(i) for i in range(k)]
    counts, correct = conf.sum(1).tolist(), conf.diagonal().tolist()
    per = [{"class": i, "name": names[i], "n": counts[i], "correct": correct[i],
            "top1": correct[i] / counts[i] if counts[i] else None} for i in range(k)]
    off = conf.clone()
    off.fill_diagonal_(0)
    where = off.nonzero().tolist()
    # Most confused first; ties in class order, so the list is the same on every run.
    where.sort(key=lambda tp: (-int(off[tp[0], tp[1]]), tp[0], tp[1]))
    pairs = [{"true": t, "true_name": names[t], "predicted": p, "predicted_name": names[p],
              "count": int(off[t, p])} for t, p in where[:PAIRS]]
    return {"per_class": per, "confused": pairs}


def evaluate_checkpoint(path: str, config: str | None = None,
                        overrides: list[str] | tuple[str, ...] = (),
                        protocols: list[str] | None = None, per_class: bool = False) -> dict:
    """Rebuild model and data from a checkpoint and score it (see :func:`report`)."""
    return score(checkpoint_subject(path, config, overrides), protocols, per_class)


def evaluate_weights(spec: str, arch: str, config: str,
                     overrides: list[str] | tuple[str, ...] = (), source: str | None = None,
                     protocols: list[str] | None = None, per_class: bool = False) -> dict:
    """Score a plain state dict (file or torchvision:NAME) under ``config``."""
    return score(weights_subject(spec, arch, config, overrides, source), protocols, per_class)


# --------------------------------------------------------------------------- output


def table(result: dict) -> str:
    """The comparison table: one row per protocol."""
    head = (f"{'protocol':<11}{'top-1 err %':>13}{'top-5 err %':>13}{'top-1 acc %':>13}"
            f"{'top-5 acc %':>13}{'loss':>9}{'N':>8}{'images/s':>10}")
    rows = [head]
    for name, r in result["protocols"].items():
        speed = f"{r['images_per_s']:.1f}" if r["images_per_s"] is not None else "-"
        rows.append(f"{name:<11}{100 * (1 - r['top1']):>13.2f}{100 * (1 - r['top5']):>13.2f}"
                    f"{100 * r['top1']:>13.2f}{100 * r['top5']:>13.2f}{r['loss']:>9.4f}"
                    f"{r['n']:>8}{speed:>10}")
    return "\n".join(rows)


def per_class_text(name: str, r: dict) -> str:
    """The worst classes by top-1 and the most-confused pairs of one protocol."""
    seen = [c for c in r["per_class"] if c["n"]]
    worst = sorted(seen, key=lambda c: (c["top1"], c["class"]))[:WORST]
    lines = [f"per class ({name}): the {len(worst)} worst of {len(seen)} classes by top-1",
             f"  {'class':>5}  {'name':<20}{'top-1 %':>8}  correct / N"]
    lines += [f"  {c['class']:>5}  {c['name']:<20}{100 * c['top1']:>8.2f}  "
              f"{c['correct']} / {c['n']}" for c in worst]
    lines.append(f"most confused ({name}): true -> predicted, images")
    lines += [f"  {p['true_name']} -> {p['predicted_name']}: {p['count']}"
              for p in r["confused"]] or ["  (none: every image is classified correctly)"]
    return "\n".join(lines)


def describe(result: dict) -> str:
    if result["checkpoint"] is not None:
        step = result["global_step"]
        return (f"checkpoint {result['checkpoint']} ({result['arch']}"
                f"{'' if step is None else f', after {step} steps'}) on {result['dataset']}")
    return (f"weights {result['weights']} ({result['arch']}, layout {result['from']}) "
            f"on {result['dataset']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if (args.checkpoint is None) == (args.weights is None):
            raise UserError("give exactly one of --checkpoint PATH (ours) or --weights SPEC "
                            "(a plain state dict)")
        if args.weights is None and (args.arch or args.source):
            raise UserError(f"{'--arch' if args.arch else '--from'} goes with --weights; a "
                            "checkpoint's stored config names its model")
        if args.weights is not None:
            r = evaluate_weights(args.weights, args.arch, args.config, args.overrides,
                                 args.source, args.protocol, args.per_class)
        else:
            r = evaluate_checkpoint(args.checkpoint, args.config, args.overrides,
                                    args.protocol, args.per_class)
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
            return 0
        print(describe(r))
        print(table(r))
        for name, p in r["protocols"].items():
            if p["bad_images"]:
                some = p["bad_paths"][:3]
                eg = (", e.g. " + ", ".join(some)) if some else " (on other ranks)"
                print(f"warning: {name}: skipped {p['bad_images']} unreadable images (not "
                      f"counted in N){eg}")
            if "per_class" in p:
                print(per_class_text(name, p))
        if args.json:
            write_json(args.json, r)
        return 0

    return run_main("resnet-eval", body)


if __name__ == "__main__":
    sys.exit(main())

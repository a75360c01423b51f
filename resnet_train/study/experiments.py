"""Every experiment of both papers, as data: the README's experiment table is generated
from ``EXPERIMENTS`` (``scripts/experiment_table.py``) and ``tests/test_experiments.py``
checks each config's key settings against it.

DRL: He et al. 2015, "Deep Residual Learning for Image Recognition". IM: He et al. 2016,
"Identity Mappings in Deep Residual Networks". Numbers are as the papers print them: error
in % (ImageNet: top-1 / top-5), "fail" where IM reports test error above 20%. ``measured``
stays "not yet run" until a run of that config exists; then it names the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Experiment:
    paper: str            # "DRL" or "IM"
    where: str            # table or figure
    row: str              # the row as the paper labels it
    config: str           # file in configs/
    number: str           # the paper's number
    expect: dict = field(default_factory=dict)  # dotted config key -> value
    how: str = ""         # an evaluation beyond the config's own, if the row needs one
    measured: str = "not yet run"


# Key settings of each recipe, checked on every config that uses it.
DRL_CIFAR = {"data.dataset": "cifar10", "data.batch_size": 128, "optim.lr": 0.1,
             "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "data.val_split": "test",
             "data.normalize": "pixel_mean", "schedule.milestones": [32000, 48000],
             "train.iterations": 64000, "schedule.warmup": 0, "train.amp": "none"}
IM_CIFAR = {**DRL_CIFAR, "data.normalize": "channel", "schedule.warmup": 400,
            "schedule.warmup_unit": "iter", "schedule.warmup_shape": "constant",
            "schedule.warmup_start_factor": 0.1, "schedule.low_lr_until_error": None}
DRL_IMAGENET = {"data.dataset": "imagenet", "data.batch_size": 256, "optim.lr": 0.1,
                "data.train.aug": "paper", "data.train.scale": [256, 480],
                "data.train.pca_lighting": 0.1, "data.normalize": "pixel_mean",
                "schedule.name": "plateau", "data.val.final_protocol": "ten_crop",
                "model.variant": "v1", "train.amp": "none"}
IM_IMAGENET = {**DRL_IMAGENET, "schedule.name": "multistep", "schedule.milestones": [30, 60],
               "schedule.unit": "epoch", "train.epochs": 90, "data.val.resize": 320,
               "data.val.crop": 320, "data.val.final_protocol": "same"}
WARM_110 = {"schedule.low_lr_until_error": 0.8, "schedule.low_lr_factor": 0.1}
MULTISCALE = "resnet-eval last.pt data.val.protocol=multiscale"


def _drl_imagenet() -> list[Experiment]:
    e = []
    for row, cfg, num, arch, sc in [
            ("plain-18", "imagenet_plain18", "27.94", "plain18", None),
            ("plain-34", "imagenet_plain34", "28.54", "plain34", None),
            ("ResNet-18 (A)", "imagenet_r18_optionA", "27.88", "resnet18", "A"),
            ("ResNet-34 (A)", "imagenet_r34_optionA", "25.03", "resnet34", "A")]:
        e.append(Experiment("DRL", "Table 2, Fig. 4", row, cfg, num,
                            {**DRL_IMAGENET, "model.arch": arch, "model.shortcut": sc}))
    for row, cfg, num, arch, sc in [
            ("plain-34", "imagenet_plain34", "28.54 / 10.02", "plain34", None),
            ("ResNet-34 A", "imagenet_r34_optionA", "25.03 / 7.76", "resnet34", "A"),
            ("ResNet-34 B", "imagenet_r34", "24.52 / 7.46", "resnet34", "B"),
            ("ResNet-34 C", "imagenet_r34_optionC", "24.19 / 7.40", "resnet34", "C"),
            ("ResNet-50", "imagenet_r50", "22.85 / 6.71", "resnet50", "B"),
            ("ResNet-101", "imagenet_r101", "21.75 / 6.05", "resnet101", "B"),
            ("ResNet-152", "imagenet_r152", "21.43 / 5.71", "resnet152", "B")]:
        e.append(Experiment("DRL", "Table 3", row, cfg, num,
                            {**DRL_IMAGENET, "model.arch": arch, "model.shortcut": sc}))
    for row, cfg, num, arch, sc in [
            ("ResNet-34 B", "imagenet_r34", "21.84 / 5.71", "resnet34", "B"),
            ("ResNet-34 C", "imagenet_r34_optionC", "21.53 / 5.60", "resnet34", "C"),
            ("ResNet-50", "imagenet_r50", "20.74 / 5.25", "resnet50", "B"),
            ("ResNet-101", "imagenet_r101", "19.87 / 4.60", "resnet101", "B"),
            ("ResNet-152", "imagenet_r152", "19.38 / 4.49", "resnet152", "B")]:
        e.append(Experiment("DRL", "Table 4", row, cfg, num,
                            {**DRL_IMAGENET, "model.arch": arch, "model.shortcut": sc},
                            how=MULTISCALE))
    return e


def _drl_cifar() -> list[Experiment]:
    e = []
    for depth, num in [(20, "8.75"), (32, "7.51"), (44, "7.17"), (56, "6.97"),
                       (110, "6.43 (6.61 +- 0.16)"), (1202, "7.93")]:
        warm = WARM_110 if depth >= 110 else {}
        e.append(Experiment("DRL", "Table 6, Fig. 6", f"ResNet-{depth}",
                            f"cifar10_resnet{depth}", num,
                            {**DRL_CIFAR, **warm, "model.arch": f"resnet{depth}"}))
    for depth in (20, 32, 44, 56, 110):
        e.append(Experiment("DRL", "Fig. 6 (curves)", f"plain-{depth}", f"cifar10_plain{depth}",
                            "curves only", {**DRL_CIFAR, "model.arch": f"plain{depth}"}))
    return e


def _im_table1() -> list[Experiment]:
    base = {**IM_CIFAR, "model.arch": "resnet110", "model.unit": "original"}
    e = [Experiment("IM", "Table 1", "original", "cifar10_resnet110_unit_original", "6.61",
                    {**base, "model.shortcut_variant": None}),
         Experiment("IM", "Table 1", "constant scaling 0 / 1 (a plain net)", "cifar10_plain110",
                    "fail", {**DRL_CIFAR, "model.arch": "plain110"},
                    how="DRL's recipe (IM gives none of its own for it)")]
    for row, variant, num in [
            ("constant scaling 0.5 / 1", "scale_shortcut", "fail"),
            ("constant scaling 0.5 / 0.5", "scale_both", "12.35"),
            ("exclusive gating, b_g 0 to -5", "exclusive_gating_b0", "fail"),
            ("exclusive gating, b_g -6", "exclusive_gating", "8.70"),
            ("exclusive gating, b_g -7", "exclusive_gating_b7", "9.81"),
            ("shortcut-only gating, b_g 0", "shortcut_gating_b0", "12.86"),
            ("shortcut-only gating, b_g -6", "shortcut_gating", "6.91"),
            ("1x1 conv shortcut", "conv", "12.22"),
            ("dropout shortcut (0.5)", "dropout", "fail")]:
        e.append(Experiment("IM", "Table 1", row, f"cifar10_resnet110_shortcut_{variant}", num,
                            {**base, "model.shortcut_variant": variant}))
    return e


def _im_tables2to4() -> list[Experiment]:
    e = []
    numbers = {"original": ("6.61", "5.93"), "bn_after_add": ("8.17", "6.50"),
               "relu_before_add": ("7.84", "6.14"), "relu_only_preact": ("6.71", "5.91"),
               "full_preact": ("6.37", "5.46")}
    for unit, (n110, n164) in numbers.items():
        for depth, num in ((110, n110), (164, n164)):
            e.append(Experiment("IM", "Table 2, Fig. 6", f"ResNet-{depth}, {unit}",
                                f"cifar10_resnet{depth}_unit_{unit}", num,
                                {**IM_CIFAR, "model.arch": f"resnet{depth}",
                                 "model.unit": unit}))
    for row, cfg, num, arch, ds in [
            ("C10 ResNet-110 (1layer), original", "cifar10_resnet110_1layer", "9.90",
             "resnet110_1layer", "cifar10"),
            ("C10 ResNet-110 (1layer), pre-act", "cifar10_preact_resnet110_1layer", "8.91",
             "preact_resnet110_1layer", "cifar10"),
            ("C10 ResNet-110, pre-act", "cifar10_preact_resnet110", "6.37", "preact_resnet110",
             "cifar10"),
            ("C10 ResNet-164, pre-act", "cifar10_preact_resnet164", "5.46", "preact_resnet164",
             "cifar10"),
            ("C10 ResNet-1001, original (Fig. 1)", "cifar10_resnet1001", "7.61", "resnet1001",
             "cifar10"),
            ("C10 ResNet-1001, pre-act (Fig. 1)", "cifar10_preact_resnet1001",
             "4.92 (4.89 +- 0.14)", "preact_resnet1001", "cifar10"),
            ("C100 ResNet-164, original", "cifar100_resnet164", "25.16", "resnet164",
             "cifar100"),
            ("C100 ResNet-164, pre-act", "cifar100_preact_resnet164", "24.33",
             "preact_resnet164", "cifar100"),
            ("C100 ResNet-1001, original", "cifar100_resnet1001", "27.82", "resnet1001",
             "cifar100"),
            ("C100 ResNet-1001, pre-act", "cifar100_preact_resnet1001", "22.71 (22.68 +- 0.22)",
             "preact_resnet1001", "cifar100")]:
        e.append(Experiment("IM", "Tables 3, 4", row, cfg, num,
                            {**IM_CIFAR, "model.arch": arch, "data.dataset": ds}))
    b64 = {k: v for k, v in IM_CIFAR.items() if not k.startswith(("schedule.", "train."))}
    e.append(Experiment("IM", "Table 4", "C10 ResNet-1001, pre-act, batch 64",
                        "cifar10_preact_resnet1001_b64", "4.62 (4.69 +- 0.20)",
                        {**b64, "model.arch": "preact_resnet1001", "data.batch_size": 64,
                         "train.amp": "none", "optim.nesterov": True,
                         "train.epochs": 200, "schedule.milestones": [80, 121],
                         "schedule.warmup": 0}))
    return e


def _im_imagenet() -> list[Experiment]:
    single224 = {"data.val.resize": 256, "data.val.crop": 224}
    # IM's "original" ResNet-101/152 numbers are DRL's released models (its README: 23.6 / 7.1
    # and 23.0 / 6.7 single-crop), tested IM's way: DRL's recipe, IM's test crop.
    drl = {**DRL_IMAGENET, "data.val.resize": 320, "data.val.crop": 320,
           "data.val.final_protocol": "same"}
    e = [Experiment("IM", "Table 5", row, "imagenet_im_r152", num,
                    {**drl, "model.arch": "resnet152"}, how=how)
         for row, num, how in [
             ("ResNet-152 original (DRL's), 224 test", "23.0 / 6.7",
              "resnet-eval last.pt data.val.resize=256 data.val.crop=224"),
             ("ResNet-152 original (DRL's)", "21.3 / 5.5", "")]]
    rows = [
            ("ResNet-152 pre-act", "imagenet_preact_r152", "21.1 / 5.5", "preact_resnet152",
             {}, ""),
            ("ResNet-200 original", "imagenet_im_r200", "21.8 / 6.0", "resnet200", {}, ""),
            ("ResNet-200 pre-act", "imagenet_preact_r200", "20.7 / 5.3", "preact_resnet200",
             {}, ""),
            ("ResNet-200 pre-act, scale + aspect ratio", "imagenet_preact_r200_fb", "20.1 / 4.8",
             "preact_resnet200", {"data.train.aug": "random_resized_crop",
                                  "data.normalize": "channel", "optim.nesterov": True,
                                  "model.variant": "v1.5"}, "")]
    e += [Experiment("IM", "Table 5", row, cfg, num, {**IM_IMAGENET, "model.arch": arch, **x},
                     how=how) for row, cfg, num, arch, x, how in rows]
    e.append(Experiment("IM", "Sec. 5 (text)", "ResNet-101 original (DRL's)", "imagenet_im_r101",
                        "23.6 / 7.1", {**drl, **single224, "model.arch": "resnet101"}))
    e.append(Experiment("IM", "Sec. 5 (text)", "ResNet-101 BN after addition",
                        "imagenet_im_r101_bn_after_add", "24.6 / 7.5",
                        {**IM_IMAGENET, **single224, "model.arch": "resnet101",
                         "model.unit": "bn_after_add"}))
    return e


EXPERIMENTS: list[Experiment] = (_drl_imagenet() + _drl_cifar() + _im_table1()
                                 + _im_tables2to4() + _im_imagenet())

# Parts of the papers that are not a classification run of this tool, said plainly.
NOT_COVERED = [
    "DRL Table 5 (an ensemble of six models on the ImageNet test server)",
    "DRL Tables 7-14 (PASCAL VOC / MS COCO detection, ImageNet localization: Faster R-CNN)",
    "DRL Fig. 7 (layer response std) is an analysis of trained nets, not a run: "
    "resnet-analyze on the Table 6 / Fig. 6 checkpoints",
]

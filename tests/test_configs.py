"""Every shipped config loads, validates and names a buildable network."""

import glob
import os
import re

import pytest

from resnet_train.config import load_config
from resnet_train.models import ARCHS, arch_family, build_model

from .helpers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_paper_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"quickstart.yaml", "imagenet_r50.yaml", "cifar10_resnet110.yaml",
            "cifar10_preact_resnet1001.yaml", "imagenet_plain34.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads(path, tmp_path):
    cfg = load_config(path, [f"data.root={tmp_path}"])
    assert cfg.model.arch in ARCHS
    family = arch_family(cfg.model.arch)
    if cfg.data.dataset in ("cifar10", "cifar100", "synthetic"):
        assert family == "cifar"
    else:
        assert family == "imagenet"
    # the options in the file are accepted by the model builder (tiny width keeps it cheap)
    depth = int(re.search(r"\d+", cfg.model.arch).group())  # resnet110_1layer: 110
    if depth <= 110:
        m = cfg.model
        build_model(m.arch, 10, variant=m.variant, shortcut=m.shortcut, unit=m.unit,
                    zero_init_residual=m.zero_init_residual,
                    shortcut_variant=m.shortcut_variant, width=4)


def test_paper_recipes():
    c = load_config(os.path.join(ROOT, "configs", "cifar10_resnet110.yaml"),
                    ["data.root=/tmp"])
    assert (c.train.iterations, c.schedule.unit, c.schedule.milestones) == (64000, "iter",
                                                                             [32000, 48000])
    # Table 6 is test error: train on all 50k, validate on the test set
    assert c.schedule.low_lr_until_error == 0.8 and c.data.val_split == "test"
    i = load_config(os.path.join(ROOT, "configs", "imagenet_r50.yaml"), ["data.root=/tmp"])
    assert (i.data.batch_size, i.optim.lr, i.schedule.name) == (256, 0.1, "plateau")
    assert i.data.train.scale == [256, 480] and i.data.train.pca_lighting == 0.1
    assert (i.model.variant, i.model.shortcut) == ("v1", "B")
    # He et al. 2016 appendix: ImageNet lr 0.1, no warm-up, / 10 at 30 and 60 epochs;
    # Table 5 tests a single 320 crop at s = 320
    r = load_config(os.path.join(ROOT, "configs", "imagenet_preact_r200.yaml"),
                    ["data.root=/tmp"])
    assert (r.model.arch, r.schedule.name, r.schedule.unit, r.schedule.milestones,
            r.schedule.warmup, r.schedule.low_lr_until_error) == (
        "preact_resnet200", "multistep", "epoch", [30, 60], 0, None)
    assert (r.data.val.resize, r.data.val.crop, r.data.batch_size) == (320, 320, 256)
    # IM's CIFAR recipe: the constant 0.01 warm-up for 400 iterations, then DRL's steps
    p = load_config(os.path.join(ROOT, "configs", "cifar10_preact_resnet164.yaml"),
                    ["data.root=/tmp"])
    assert (p.schedule.warmup, p.schedule.warmup_shape, p.schedule.milestones,
            p.train.iterations, p.data.batch_size) == (400, "constant", [32000, 48000], 64000,
                                                       128)


def test_shortcut_variant_configs_cover_im_table1():
    import typing

    from resnet_train.config import ModelConfig
    from resnet_train.models import SHORTCUT_VARIANTS
    hint = typing.get_type_hints(ModelConfig)["shortcut_variant"]
    literal = next(a for a in typing.get_args(hint) if a is not type(None))
    assert set(typing.get_args(literal)) == set(SHORTCUT_VARIANTS)
    for name in SHORTCUT_VARIANTS:
        path = os.path.join(ROOT, "configs", f"cifar10_resnet110_shortcut_{name}.yaml")
        c = load_config(path, ["data.root=/tmp"])
        assert (c.model.arch, c.model.unit, c.model.shortcut_variant) == ("resnet110",
                                                                          "original", name)
        # IM's CIFAR warm-up: lr x 0.1 for the first 400 iterations (not DRL's 80% rule)
        assert c.schedule.low_lr_until_error is None
        assert (c.schedule.warmup, c.schedule.warmup_unit, c.schedule.warmup_shape,
                c.schedule.warmup_start_factor) == (400, "iter", "constant", 0.1)
        with open(path) as f:
            assert "Table 1" in f.readline() + f.readline()

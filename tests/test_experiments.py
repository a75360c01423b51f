"""The experiment table (README) against the configs: every paper config is in it, and each
row's recipe keys are what its config resolves to."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from resnet_train.config import load_config
from resnet_train.study.experiments import EXPERIMENTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Recipes that others inherit, and configs that are not a paper experiment.
NOT_EXPERIMENTS = {"cifar10_paper", "cifar10_preact_paper", "imagenet_paper",
                   "imagenet_im_paper", "quickstart", "synthetic_imagenet_r50",
                   "imagenet_r50_modern", "finetune_folder", "imagenet_torchvision_eval",
                   "cifar10_akamaster",
                   "imagenet_r18"}  # option B: the papers report ResNet-18 only with A


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda e: f"{e.paper}-{e.where}-{e.row}")
def test_config_has_the_rows_recipe(exp):
    cfg = load_config(os.path.join(ROOT, "configs", f"{exp.config}.yaml"), ["data.root=/tmp"])
    wrong = {k: (_get(cfg, k), v) for k, v in exp.expect.items() if _get(cfg, k) != v}
    assert not wrong, f"{exp.config}: key: (config, table) {wrong}"
    assert exp.measured == "not yet run" or exp.measured.startswith("run ")


def test_every_paper_config_is_in_the_table():
    configs = {f[:-5] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")}
    listed = {e.config for e in EXPERIMENTS}
    assert listed <= configs  # no row names a missing file
    assert configs - NOT_EXPERIMENTS == listed


def test_the_table_names_each_row_once_and_numbers_every_row():
    keys = [(e.paper, e.where, e.row) for e in EXPERIMENTS]
    assert len(keys) == len(set(keys))
    assert all(e.number for e in EXPERIMENTS)
    # the degradation: plain-34 is worse than plain-18, ResNet-34 better than ResNet-18
    t2 = {e.row: float(e.number) for e in EXPERIMENTS if e.where.startswith("Table 2,")}
    assert t2["plain-34"] > t2["plain-18"] and t2["ResNet-34 (A)"] < t2["ResNet-18 (A)"]


def test_readme_experiment_table_is_current():
    r = subprocess.run([sys.executable, "scripts/experiment_table.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

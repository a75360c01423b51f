"""Config schema: loading, inheritance, overrides of every type, and every error path."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from resnet_train.config import (Config, ConfigError, dump, help_text, iter_keys, load_config,
                                 replace)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_are_the_paper_sgd():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert cfg.data.batch_size == 256
    assert cfg.run_dir.endswith("runs/run")


def test_yaml_values_and_base_inheritance_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", """
        model: {arch: resnet56}
        optim: {lr: 0.2, weight_decay: 5.0e-4}
        train: {epochs: 90}
    """)
    write(tmp_path / "sub" / "mid.yaml", """
        base: ../root.yaml
        optim: {lr: 0.05}
        schedule: {milestones: [30, 60]}
    """)
    leaf = write(tmp_path / "sub" / "leaf.yaml", """
        base: mid.yaml
        train: {epochs: 3}
        optim: {weight_decay: 1e-4}   # YAML 1.1 reads this as a string; coerced to float
    """)
    cfg = load_config(leaf)
    assert cfg.model.arch == "resnet56"          # from the root, two levels up
    assert cfg.optim.lr == 0.05                  # mid overrides root
    assert cfg.optim.weight_decay == 1e-4        # leaf overrides root
    assert cfg.schedule.milestones == [30, 60]
    assert cfg.train.epochs == 3


@pytest.mark.parametrize("override, key, expected", [
    ("train.epochs=7", ("train", "epochs"), 7),
    ("optim.lr=1e-4", ("optim", "lr"), 1e-4),
    ("optim.lr=0.25", ("optim", "lr"), 0.25),
    ("optim.weight_decay=0", ("optim", "weight_decay"), 0.0),
    ("optim.nesterov=true", ("optim", "nesterov"), True),
    ("run.deterministic=False", ("run", "deterministic"), False),
    ("schedule.milestones=[30,60]", ("schedule", "milestones"), [30, 60]),
    ("schedule.milestones=[32000, 48000]", ("schedule", "milestones"), [32000, 48000]),
    ("data.mean=[0.5,0.4,0.3]", ("data", "mean"), [0.5, 0.4, 0.3]),
    ("data.mean=null", ("data", "mean"), None),
    ("model.width=null", ("model", "width"), None),
    ("model.width=8", ("model", "width"), 8),
    ("run.name=1e3", ("run", "name"), "1e3"),       # strings stay verbatim
    ("run.name=yes", ("run", "name"), "yes"),
    ("train.amp=bf16", ("train", "amp"), "bf16"),
    ("model.shortcut=A", ("model", "shortcut"), "A"),
    ("data.train.scale=[256,480]", ("data", "train", "scale"), [256, 480]),
    ("train.iterations=64000", ("train", "iterations"), 64000),
])
def test_every_override_type(override, key, expected):
    cfg = load_config(None, [override])
    value = cfg
    for part in key:
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


def test_override_beats_file(tmp_path):
    path = write(tmp_path / "c.yaml", "optim: {lr: 0.3}\n")
    assert load_config(path, ["optim.lr=0.01"]).optim.lr == 0.01


@pytest.mark.parametrize("override, fragments", [
    ("optim.lrr=0.1", ["optim.lrr", "optim.lr"]),
    ("data.trian.crop=3", ["data.trian.crop", "data.train.crop"]),
    ("optim.lr=abc", ["optim.lr", "float", "abc"]),
    ("train.epochs=2.5", ["train.epochs", "int", "2.5"]),
    ("optim.nesterov=maybe", ["optim.nesterov", "bool", "maybe"]),
    ("schedule.milestones=[30,x]", ["schedule.milestones", "int", "x"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("optim.lr=-0.1", ["optim.lr", "> 0"]),
    ("optim.weight_decay=-1e-4", ["optim.weight_decay", ">= 0"]),
    ("optim.momentum=1", ["optim.momentum", "< 1"]),
    ("optim.momentum=-0.1", ["optim.momentum", ">= 0"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
    ("train.epochs=0", ["train.epochs", ">= 1"]),
    ("train.amp=fp8", ["train.amp", "fp8", "bf16", "fp16"]),
    ("data.dataset=mnist", ["data.dataset", "cifar10", "imagenet"]),
    ("lr", ["lr", "key=value"]),
])
def test_bad_values_name_the_key(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg


def test_crop_larger_than_smallest_scale(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train.crop: 300 .* data.train.scale\[0\]=256"):
        load_config(None, ["data.dataset=folder", f"data.root={tmp_path}", "data.train.crop=300"])


def test_unknown_key_in_yaml_suggests(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match="'optim.momentun'; did you mean 'optim.momentum'"):
        load_config(path)


def test_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    path = write(tmp_path / "c.yaml", "base: missing_base.yaml\n")
    with pytest.raises(ConfigError, match="base config file not found: .*missing_base.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="data.root: directory not found: .*absent"):
        load_config(None, ["data.dataset=imagenet", f"data.root={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match="data.root: required"):
        load_config(None, ["data.dataset=cifar10"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "run:\n  name: x\noptim: {lr: [0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:4: malformed YAML") or f"{path}:" in str(e.value)
    assert "bad.yaml:" in str(e.value)


def test_base_loop_detected(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))


def test_dump_round_trips_and_replace(tmp_path):
    cfg = load_config(None, ["optim.lr=0.05", "schedule.milestones=[1,2]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump(cfg))
    assert load_config(str(path)) == cfg
    assert replace(cfg, **{"train.epochs": 3}).train.epochs == 3
    with pytest.raises(Exception):
        cfg.optim.lr = 1.0  # frozen


def test_help_lists_every_key_with_type_default_and_help():
    text = help_text()
    keys = [k for k, _, _ in iter_keys()]
    assert len(keys) > 60
    for key in keys:
        assert f"  {key} (" in text
    assert "optim.lr (float, default 0.1)" in text
    assert "train.amp (one of auto|none|bf16|fp16, default auto)" in text


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "resnet_train.cli.train", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_errors_exit_2_one_line_no_traceback(tmp_path):
    bad = write(tmp_path / "bad.yaml", "optim: {lr: 0.1\n")
    cases = [
        (["optim.lrr=1"], "optim.lrr"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        (["--config", bad], "bad.yaml"),
        (["optim.momentum=1.5"], "optim.momentum"),
    ]
    for args, culprit in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and culprit in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_cli_print_config_and_help(tmp_path):
    r = run_cli("--print-config", "optim.lr=0.02", "model.arch=resnet56")
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["optim"]["lr"] == 0.02 and printed["model"]["arch"] == "resnet56"
    r = run_cli("--help")
    assert r.returncode == 0
    assert "checkpoint.every_steps (int, default 0)" in r.stdout
    assert "data.batch_size (int, default 256)" in r.stdout


def test_readme_config_reference_is_current():
    r = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"],
                       capture_output=True, text=True,
                       cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    assert r.returncode == 0, r.stdout

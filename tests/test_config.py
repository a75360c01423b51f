"""Config schema: loading, inheritance, overrides of every type, and every error path."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from resnet_train.config import (RESUME_CLASSES, Config, ConfigError, ResumeDiff, dump, help_text,
                                 iter_keys, load_config, opt, replace, resume_changes,
                                 read_yaml, resume_class, resume_notice, resume_refusal, to_dict)


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
    # a bare base name not beside the file is the packaged config of that name; a path with
    # a (mistyped) folder is not found, never silently the packaged file of the same name
    for base in ("cifar10_paper.yaml", "./cifar10_paper.yaml"):
        path = write(tmp_path / "c.yaml", f"base: {base}\noptim:\n  lr: 0.05\n")
        data = read_yaml(path)
        assert data["data"]["dataset"] == "cifar10" and data["optim"]["lr"] == 0.05
    path = write(tmp_path / "c.yaml", "base: ../team_configs/cifar10_paper.yaml\n")
    with pytest.raises(ConfigError, match=r"base config file not found: .*team_configs/"
                                          r"cifar10_paper\.yaml"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="data.root: directory not found: .*absent"):
        load_config(None, ["data.dataset=imagenet", f"data.root={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match="data.root: required"):
        load_config(None, ["data.dataset=cifar10"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    # an unclosed bracket is found at the end of the stream (line 4); a mapping value in the
    # wrong place on the line it is on (line 3 of 5, neither the first nor the last)
    for name, text, line in (("bad.yaml", "run:\n  name: x\noptim: {lr: [0.1\n", 4),
                             ("worse.yaml", "run:\n  name: x\n  seed: 1: 2\noptim:\n  lr: 1\n",
                              3)):
        path = write(tmp_path / name, text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value).startswith(f"{path}:{line}: malformed YAML: ")


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
    with pytest.raises(AttributeError, match="cannot assign to field 'lr'"):
        cfg.optim.lr = 1.0  # frozen


def test_help_lists_every_key_with_type_default_and_help():
    text = help_text()
    keys = [k for k, _, _ in iter_keys()]
    assert len(keys) > 60
    for key in keys:
        assert f"  {key} (" in text
    assert "optim.lr (float, default 0.1)" in text
    assert "train.amp (one of auto|none|bf16|fp16, default auto)" in text
    assert "  optim.momentum (float, default 0.9) [resume: refused]\n" in text
    assert "  run.log_every (int, default 50) [resume: safe]\n" in text
    assert "  train.epochs (int, default 160) [resume: refused under cosine]\n" in text
    assert "  checkpoint.resume (str, default auto) [resume: not compared]\n" in text


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


# --------------------------------------------------------------------------- resume


def stored(*overrides):
    """A checkpoint's stored config, as the trainer saves it (dataclasses.asdict)."""
    return to_dict(load_config(None, list(overrides)))


def test_every_key_is_classified_for_resume():
    keys = {k: f.metadata["resume"] for k, _, f in iter_keys()}
    assert all(c in RESUME_CLASSES for c in keys.values())
    expected = {
        "state": ["model.arch", "model.variant", "model.shortcut", "model.unit",
                  "model.zero_init_residual", "model.shortcut_variant", "model.width",
                  "data.dataset", "data.num_classes",
                  "data.image_size", "data.train_samples", "data.synthetic_classes",
                  "data.val_split", "data.holdout_size", "data.holdout_seed",
                  "data.cifar100_labels", "data.normalize", "data.mean", "data.std",
                  "data.divide_std", "data.pixel_mean_samples", "data.jpeg_draft", "data.decode",
                  "data.batch_size",
                  "data.val.resize", "data.val_fraction", "model.weights", "model.weights_from",
                  "model.freeze", "train.accum_steps", "train.label_smoothing", "run.seed"]
                 + [k for k in keys if k.split(".")[0] in ("optim", "schedule")]
                 + [k for k in keys if k.startswith("data.train.")],
        "safe": ["run.name", "run.dir", "run.deterministic", "run.device", "run.log_every",
                 "run.progress", "run.threads", "run.keep_host_memory",
                 "run.diagnostics_every", "model.log_block_norms",
                 "data.root",
                 "data.workers",
                 "data.train_dir", "data.download", "data.on_bad_image",
                 "data.pin_memory", "data.prefetch", "data.val.final_protocol", "train.amp",
                 "train.channels_last",
                 "train.compile", "train.max_bad_steps", "checkpoint.every_steps",
                 "checkpoint.every_epochs", "checkpoint.keep_last", "checkpoint.signals",
                 "checkpoint.signal_check_every"],
        "length": ["train.epochs", "train.iterations"],
        "eval": ["data.val.crop", "data.val.protocol", "data.val.scales", "data.val.flip",
                 "train.precise_bn",
                 "data.val_samples", "train.eval_every", "data.val_dir"],
        "ignored": ["checkpoint.resume", "checkpoint.allow_changes"],
    }
    assert sorted(k for ks in expected.values() for k in ks) == sorted(keys)  # all, once
    for cls, ks in expected.items():
        for k in ks:
            assert keys[k] == cls, k
    assert resume_class("optim.momentum") is RESUME_CLASSES["state"]
    with pytest.raises(TypeError):
        opt(1, "a key without a resume class")  # noqa
    with pytest.raises(ValueError, match="maybe"):
        opt(1, "a key with a bogus class", resume="maybe")


@pytest.mark.parametrize("old, new, fragment", [
    ("optim.momentum=0.9", "optim.momentum=0.8", "optim.momentum: 0.9 -> 0.8"),
    ("model.unit=null", "model.unit=full_preact", "model.unit: null -> full_preact"),
    ("data.batch_size=128", "data.batch_size=64", "data.batch_size: 128 -> 64"),
    ("run.seed=0", "run.seed=1", "run.seed: 0 -> 1"),
    ("data.train.scale=[256,480]", "data.train.scale=[256,512]",
     "data.train.scale: [256, 480] -> [256, 512]"),
])
def test_state_changes_are_refused(old, new, fragment):
    diff = resume_changes(stored(old), load_config(None, [new]))
    assert diff.refused == [fragment]
    assert diff.refused_keys == [fragment.split(":")[0]]
    assert diff.applied == [] and diff.applied_keys == []


def test_refusal_and_notice_texts():
    cfg = load_config(None, ["data.batch_size=64", "run.seed=1", "run.log_every=10"])
    diff = resume_changes(stored("data.batch_size=128"), cfg)
    assert resume_refusal("runs/x/checkpoints/last.pt", diff) == (
        "checkpoint runs/x/checkpoints/last.pt was written with a different config: "
        "run.seed: 0 -> 1, data.batch_size: 128 -> 64; these change what the saved state "
        "means. Restore them, start a new run.dir, or allow them with "
        "checkpoint.allow_changes=[run.seed,data.batch_size]")
    assert resume_notice(diff) == "resuming with changed settings: run.log_every: 50 -> 10"
    # The suggested override is one the loader accepts and that then allows the change.
    allowed = load_config(None, ["data.batch_size=64", "run.seed=1", "run.log_every=10",
                                 "checkpoint.allow_changes=[run.seed,data.batch_size]"])
    assert resume_changes(stored("data.batch_size=128"), allowed).refused == []


def test_safe_changes_are_applied():
    old = stored("run.log_every=50", "data.workers=4", "data.root=/data/a", "train.epochs=10")
    cfg = load_config(None, ["run.log_every=10", "data.workers=0", "data.root=/mnt/b",
                             "train.epochs=20", "checkpoint.keep_last=0"])
    diff = resume_changes(old, cfg)
    assert diff.refused == [] and diff.refused_keys == []
    assert diff.applied == ["run.log_every: 50 -> 10", "data.root: /data/a -> /mnt/b",
                            "data.workers: 4 -> 0", "train.epochs: 10 -> 20",
                            "checkpoint.keep_last: 3 -> 0"]
    assert diff.applied_keys == ["run.log_every", "data.root", "data.workers", "train.epochs",
                                 "checkpoint.keep_last"]
    assert resume_notice(diff).startswith(
        "resuming with changed settings: run.log_every: 50 -> 10, data.root: /data/a -> /mnt/b,")


def test_unchanged_config_has_no_changes():
    cfg = load_config(None, ["optim.lr=0.05", "schedule.milestones=[1,2]", "data.mean=[.5,.4,.3]"])
    assert resume_changes(to_dict(cfg), cfg) == ResumeDiff([], [], [], [], [])


def test_length_change_is_refused_under_cosine_only():
    old = stored("schedule.name=cosine", "train.epochs=10")
    diff = resume_changes(old, load_config(None, ["schedule.name=cosine", "train.epochs=20"]))
    assert diff.refused == ["train.epochs: 10 -> 20"] and diff.applied == []
    text = resume_refusal("last.pt", diff)
    assert "train.epochs: 10 -> 20" in text and "schedule.name=cosine" in text
    assert text.endswith("checkpoint.allow_changes=[train.epochs]")
    diff = resume_changes(stored("schedule.name=cosine"),
                          load_config(None, ["schedule.name=cosine", "train.iterations=5000"]))
    assert diff.refused == ["train.iterations: null -> 5000"]
    allowed = load_config(None, ["schedule.name=cosine", "train.epochs=20",
                                 "checkpoint.allow_changes=[train.epochs]"])
    assert resume_changes(old, allowed).applied == ["train.epochs: 10 -> 20"]
    for name in ("multistep", "step", "constant", "plateau"):
        diff = resume_changes(stored(f"schedule.name={name}", "train.epochs=10"),
                              load_config(None, [f"schedule.name={name}", "train.epochs=5"]))
        assert (diff.applied, diff.refused) == (["train.epochs: 10 -> 5"], []), name


def test_validation_change_is_refused_under_plateau_only():
    for name, refused in (("multistep", False), ("plateau", True)):
        diff = resume_changes(stored(f"schedule.name={name}"),
                              load_config(None, [f"schedule.name={name}", "data.val.crop=192",
                                                 "train.eval_every=2"]))
        changes = ["data.val.crop: 224 -> 192", "train.eval_every: 1 -> 2"]
        assert (diff.refused if refused else diff.applied) == changes, name
        assert (diff.applied if refused else diff.refused) == [], name
        if refused:
            assert "schedule.name=plateau" in resume_refusal("last.pt", diff)


def test_allow_changes_by_key_section_and_all():
    old = stored("optim.momentum=0.9", "optim.weight_decay=1e-4", "data.train.crop=224",
                 "run.seed=0")
    changes = ["optim.momentum=0.8", "optim.weight_decay=5e-4", "data.train.crop=192",
               "run.seed=3"]

    def diff(*allow):
        return resume_changes(old, load_config(None, changes + list(allow)))

    assert diff().refused_keys == ["run.seed", "data.train.crop", "optim.momentum",
                                   "optim.weight_decay"]
    d = diff("checkpoint.allow_changes=[optim.weight_decay]")
    assert d.applied == ["optim.weight_decay: 0.0001 -> 0.0005"]
    assert d.refused_keys == ["run.seed", "data.train.crop", "optim.momentum"]
    d = diff("checkpoint.allow_changes=[optim,data]")  # sections, data covers data.train.*
    assert d.applied_keys == ["data.train.crop", "optim.momentum", "optim.weight_decay"]
    assert d.refused == ["run.seed: 0 -> 3"]
    d = diff("checkpoint.allow_changes=[data.train]")
    assert d.applied_keys == ["data.train.crop"]
    d = diff("checkpoint.allow_changes=all")
    assert d.refused == [] and d.applied_keys == ["run.seed", "data.train.crop",
                                                  "optim.momentum", "optim.weight_decay"]
    # A prefix is a whole section name, not a string prefix.
    with pytest.raises(ConfigError):
        load_config(None, ["checkpoint.allow_changes=[optim.weight]"])


@pytest.mark.parametrize("entries, fragments", [
    ("[optim.momentun]", ["checkpoint.allow_changes", "'optim.momentun'",
                          "did you mean 'optim.momentum'"]),
    ("[optim.lr,schedul]", ["checkpoint.allow_changes", "'schedul'", "did you mean 'schedule'"]),
    ("everything", ["checkpoint.allow_changes", "'everything'"]),
])
def test_unknown_allow_entry_is_an_error(entries, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"checkpoint.allow_changes={entries}"])
    assert "\n" not in str(e.value)
    for f in fragments:
        assert f in str(e.value)


def test_older_checkpoint_missing_keys_compare_as_defaults():
    old = stored("optim.nesterov=false", "data.train.pad=4")
    del old["optim"]["nesterov"]          # a key added after that checkpoint was written
    del old["data"]["train"]              # a whole section missing
    del old["checkpoint"]
    assert resume_changes(old, load_config(None, [])).applied == []
    assert resume_changes(old, load_config(None, [])).refused == []
    diff = resume_changes(old, load_config(None, ["optim.nesterov=true", "data.train.pad=2",
                                                  "checkpoint.keep_last=1"]))
    assert diff.refused == ["data.train.pad: 4 -> 2", "optim.nesterov: false -> true"]
    assert diff.applied == ["checkpoint.keep_last: 3 -> 1"]


def test_newer_checkpoint_extra_keys_are_ignored():
    old = stored()
    old["optim"]["future_knob"] = 3
    old["future_section"] = {"x": 1}
    old["data"]["train"]["mixup"] = 0.2
    diff = resume_changes(old, load_config(None, []))
    assert (diff.applied, diff.refused) == ([], [])


def test_stored_values_are_coerced_before_comparing():
    old = stored()
    old["optim"]["weight_decay"] = "1e-4"      # YAML 1.1 read it as a string
    old["optim"]["lr"] = 0.1                   # float == float
    old["train"]["epochs"] = 160.0             # an int stored as a float
    old["data"]["train"]["scale"] = (256, 480)  # a tuple for a list
    old["data"]["mean"] = None
    old["checkpoint"]["resume"] = "runs/other/checkpoints/last.pt"  # never compared
    old["checkpoint"]["allow_changes"] = ["all"]                     # never compared
    diff = resume_changes(old, load_config(None, []))
    assert (diff.applied, diff.refused) == ([], [])
    old["model"]["unit"] = "future_unit"        # a value this version does not accept
    old["data"]["train"] = "not a mapping"      # a malformed section: its defaults
    diff = resume_changes(old, load_config(None, ["model.unit=original"]))
    assert diff.refused == ["model.unit: future_unit -> original"]


def test_resume_texts_stay_on_one_line():
    old = stored("run.name=a b c " + "x" * 120)
    cfg = load_config(None, ["run.name=d e f " + "y" * 120, "optim.lr=0.2"])
    diff = resume_changes(old, cfg)
    assert diff.applied_keys == ["run.name"] and diff.refused_keys == ["optim.lr"]
    assert "\n" not in resume_notice(diff) and "\n" not in resume_refusal("p", diff)
    assert "a b c " + "x" * 120 in resume_notice(diff)


def test_readme_reference_shows_resume_class():
    r = subprocess.run([sys.executable, "scripts/config_reference.py"], capture_output=True,
                       text=True, check=True,
                       cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__)))
    lines = r.stdout.splitlines()
    assert lines[0] == "| key | type | default | on resume | meaning |"
    assert "| `optim.momentum` | float | `0.9` | refused | SGD momentum |" in lines
    assert any(x.startswith("| `run.log_every` | int | `50` | safe |") for x in lines)
    assert any(x.startswith("| `train.epochs` | int | `160` | refused under cosine |")
               for x in lines)


def test_only_validation_keys_in_effect_restart_the_best_model_comparison():
    """config.measuring: scales and flip measure only under the multiscale protocol,
    val_samples only for the synthetic sets; eval_every changes when, not what."""
    from resnet_train.config import measuring
    keys = ["data.val.scales", "data.val.flip", "data.val_samples", "data.val.crop",
            "train.eval_every", "run.log_every"]
    folder = load_config(data={"data": {"dataset": "folder"}}, paths=False)
    multi = load_config(data={"data": {"dataset": "folder", "val": {"protocol": "multiscale"}}},
                        paths=False)
    synthetic = load_config(data={"data": {"dataset": "synthetic"}}, paths=False)
    assert measuring(keys, folder) == ["data.val.crop"]
    assert measuring(keys, multi) == ["data.val.scales", "data.val.flip", "data.val.crop"]
    assert measuring(keys, synthetic) == ["data.val_samples", "data.val.crop"]

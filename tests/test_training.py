"""Training-loop behaviour: precision paths, accumulation, the non-finite guard, warm-up hook."""

import json
import os

import pytest
import torch

from resnet_train.cli import train as train_cli
from resnet_train.trainer import resolve_amp, resolve_channels_last

from .helpers import tiny


def last(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_bf16_channels_last_path_trains(tmp_path):
    run_dir = str(tmp_path / "bf16")
    assert train_cli.main(tiny(run_dir, "train.amp=bf16", "train.channels_last=true",
                               "train.epochs=3", "optim.lr=0.1")) == 0
    recs = metrics(run_dir)
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] - 0.05
    ckpt = last(run_dir)
    # master weights stay fp32 under autocast
    assert all(v.dtype == torch.float32 for k, v in ckpt["model"].items() if "weight" in k)


def test_amp_and_layout_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp("none", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_channels_last("auto", cpu, None) is True
    assert resolve_channels_last("auto", torch.device("cuda"), None) is False
    assert resolve_channels_last("auto", torch.device("cuda"), torch.bfloat16) is True
    assert resolve_channels_last("auto", cpu, torch.bfloat16) is True
    assert resolve_channels_last("false", cpu, torch.bfloat16) is False
    from resnet_train.errors import ConfigError
    with pytest.raises(ConfigError, match="train.amp: fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)


def test_a_skipped_non_finite_step_stays_out_of_the_train_metrics(tmp_path, capsys,
                                                                  monkeypatch):
    """One poisoned batch: its step is skipped, counted and reported, and the epoch's train
    loss is the mean over the other batches (not NaN)."""
    from resnet_train.data import transforms
    real, calls = transforms.DevicePrep.__call__, []

    def poisoned(self, x, gen=None):
        out = real(self, x, gen)
        if gen is not None:  # training batches only
            calls.append(1)
            if len(calls) == 3:
                out = out.clone().fill_(float("nan"))
        return out
    monkeypatch.setattr(transforms.DevicePrep, "__call__", poisoned)
    run_dir = str(tmp_path / "skip")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    out = capsys.readouterr().out
    rec = [r for r in metrics(run_dir) if r.get("kind") == "epoch"][0]
    assert rec["skipped_steps"] == 1
    assert 0 < rec["train_loss"] < 10 and 0 <= rec["train_top1"] <= 1
    assert "skipped 1 optimizer steps with a non-finite loss" in out
    ckpt = last(run_dir)
    assert ckpt["global_step"] == 8 and ckpt["bad_steps"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_fp16_scaler_skip_is_decided_by_the_scale_alike_on_every_rank():
    """With a GradScaler the step counts as skipped when the scaler skipped it (its scale
    fell), which follows the all-reduced gradients: a rank whose own loss is finite agrees."""
    from resnet_train.distributed import DistInfo
    from resnet_train.engine import SCALER_CALIBRATION, Meter, NonFiniteLoss, Stepper, \
        _optimizer_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    poison = {"on": True}
    head = list(model.parameters())[-1]
    head.register_hook(lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)
    scaler = torch.amp.GradScaler("cpu")
    s = Stepper(model=model, optimizer=opt, schedule=None, scaler=scaler,
                device=torch.device("cpu"), amp_dtype=None, channels_last=False,
                accum_steps=1, label_smoothing=0.0, max_bad_steps=2, dist=DistInfo(0, 2, 0),
                probe=head)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    meter = Meter(torch.device("cpu"))
    assert _optimizer_step(s, x, y, meter) is False  # finite local loss, poisoned gradients
    assert s.bad_steps == 1 and scaler.get_scale() == 2.0 ** 15
    assert meter.sums.tolist() == [0.0] * 4
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    for _ in range(SCALER_CALIBRATION):  # calibration room before a run of skips stops
        assert _optimizer_step(s, x, y, meter) is False
    with pytest.raises(NonFiniteLoss):
        _optimizer_step(s, x, y, meter)
    poison["on"] = False
    s.bad_steps = 0
    assert _optimizer_step(s, x, y, meter) is True and s.bad_steps == 0
    assert meter.sums[3].item() == 4
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_non_finite_losses_stop_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = str(tmp_path / "nan")
    assert train_cli.main(tiny(run_dir, "train.epochs=1", "checkpoint.every_steps=1")) == 0
    good = last(run_dir)
    # Continue the same run with an absurd lr: the weights blow up within a few steps.
    code = train_cli.main(tiny(run_dir, "train.epochs=2", "checkpoint.every_steps=1",
                               "optim.lr=1e12", "train.max_bad_steps=2"))
    out = capsys.readouterr().out
    assert code == 1
    assert "2 consecutive non-finite losses" in out and "last good checkpoint" in out
    ckpt = last(run_dir)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["global_step"] >= good["global_step"]


def test_accumulation_matches_the_big_batch_without_batchnorm_effects(tmp_path):
    """accum_steps=2 runs two half batches per optimizer step: same number of steps, and
    the same samples per step as accum_steps=1."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train_cli.main(tiny(a, "train.epochs=1", "run.deterministic=true")) == 0
    assert train_cli.main(tiny(b, "train.epochs=1", "run.deterministic=true",
                               "train.accum_steps=2")) == 0
    ra, rb = metrics(a)[0], metrics(b)[0]
    assert ra["global_step"] == rb["global_step"] == 8
    # Both saw the same 256 images; the per-micro-batch BN makes the numbers differ slightly.
    assert last(a)["partial"] is None and last(b)["epoch"] == 1
    wa, wb = last(a)["model"]["fc.weight"], last(b)["model"]["fc.weight"]
    assert not torch.equal(wa, wb)
    assert (wa - wb).norm() / wa.norm() < 0.5


def test_indivisible_accumulation_is_a_config_error(tmp_path, capsys):
    assert train_cli.main(tiny(str(tmp_path / "r"), "train.accum_steps=3")) == 2
    assert "train.accum_steps" in capsys.readouterr().err


def test_low_lr_warmup_switches_back_when_train_error_drops(tmp_path):
    run_dir = str(tmp_path / "w")
    # The threshold 0.95 is crossed almost at once; 0.0 is never crossed.
    assert train_cli.main(tiny(run_dir, "train.epochs=1", "schedule.low_lr_until_error=0.95",
                               "schedule.low_lr_factor=0.1")) == 0
    state = last(run_dir)["schedule"]
    assert state["low_lr_ended_at"] is not None and state["low_lr_ended_at"] < 8
    run2 = str(tmp_path / "w2")
    assert train_cli.main(tiny(run2, "train.epochs=1", "schedule.low_lr_until_error=0.0")) == 0
    assert last(run2)["schedule"]["low_lr_ended_at"] is None
    assert metrics(run2)[0]["lr"] == pytest.approx(0.005)


def test_compile_trains_like_eager_and_saves_bare_names(tmp_path, monkeypatch):
    """train.compile wraps the model in torch.compile before DDP. The aot_eager backend runs
    the real Dynamo/AOT path without needing a C++ compiler on the test machine."""
    calls = []
    real = torch.compile

    def compile_(model, **kw):
        calls.append(type(model).__name__)
        return real(model, **{**kw, "backend": "aot_eager"})
    monkeypatch.setattr(torch, "compile", compile_)
    args = ("train.epochs=1", "data.train_samples=128", "run.deterministic=true")
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    assert train_cli.main(tiny(eager, *args)) == 0
    assert calls == []
    assert train_cli.main(tiny(compiled, *args, "train.compile=true")) == 0
    assert calls == ["CifarResNet"]  # the bare model, before any DDP wrap
    a, b = last(eager)["model"], last(compiled)["model"]
    assert a.keys() == b.keys() and not any(k.startswith("_orig_mod.") for k in b)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    momentum = last(compiled)["optimizer"]["state"][0]["momentum_buffer"]
    assert float(momentum.abs().sum()) > 0  # the compiled run really stepped
    # and a compiled run resumes from its own checkpoint
    assert train_cli.main(tiny(compiled, *args, "train.compile=true", "train.epochs=2")) == 0
    assert last(compiled)["epoch"] == 2


def test_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    """The fp16 path (GradScaler) on CPU: resolve_amp refuses fp16 without CUDA, so force it;
    CPU autocast runs float16 and torch.amp.GradScaler('cpu') does the scaling."""
    import resnet_train.trainer as trainer_mod
    monkeypatch.setattr(trainer_mod, "resolve_amp", lambda mode, device: torch.float16)
    run_dir = str(tmp_path / "fp16")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    first = last(run_dir)["scaler"]
    assert first is not None and first["scale"] > 0 and first["_growth_tracker"] == 8
    seen = {}
    real_load = torch.amp.GradScaler.load_state_dict

    def load(self, state):
        seen.update(state)
        return real_load(self, state)
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", load)
    assert train_cli.main(tiny(run_dir, "train.epochs=2")) == 0
    assert seen["scale"] == first["scale"] and seen["_growth_tracker"] == 8
    after = last(run_dir)["scaler"]
    assert after["_growth_tracker"] == 16  # continued counting from the restored state
    assert all(torch.isfinite(v).all() for v in last(run_dir)["model"].values()
               if v.is_floating_point())


def test_low_lr_warmup_resumes_exactly_mid_epoch(tmp_path, monkeypatch):
    """The warm-up looks at the train error of the last 5 steps; a run stopped between two
    looks must resume with the same window (the mark is checkpointed): same switch step,
    bitwise-same weights."""
    from resnet_train.trainer import PREEMPTED_EXIT, StopFlag
    args = ("data.train_samples=512", "run.deterministic=true", "optim.lr=0.2",
            "schedule.low_lr_until_error=0.9", "train.iterations=24")
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert train_cli.main(tiny(whole, *args)) == 0
    poll, fired = StopFlag.poll, []

    def preempt_at_12(self, step):  # as if SIGTERM arrived during step 12
        if step == 12 and not fired:
            fired.append(step)
            self.received = "SIGTERM"
        return poll(self, step)
    monkeypatch.setattr(StopFlag, "poll", preempt_at_12)
    assert train_cli.main(tiny(split, *args)) == PREEMPTED_EXIT
    mid = last(split)
    assert (mid["epoch"], mid["step_in_epoch"]) == (0, 12)  # 16 steps an epoch
    assert mid["partial"]["steps"] == 12 and mid["partial"]["error_mark"][3] == 10 * 32
    assert mid["schedule"]["low_lr_ended_at"] is None
    assert train_cli.main(tiny(split, *args)) == 0
    a, b = last(whole), last(split)
    assert a["schedule"]["low_lr_ended_at"] == b["schedule"]["low_lr_ended_at"] == 15
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_ddp_ranks_skip_a_poisoned_step_alike():
    """Under DDP a NaN loss on another rank reaches this rank only through the averaged
    gradients; the step must be skipped here too, although the local loss is finite."""
    from resnet_train.distributed import DistInfo
    from resnet_train.engine import Meter, Stepper, _optimizer_step
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    head = list(model.parameters())[-1]
    # what the all-reduce would deliver when another rank's loss was NaN
    head.register_hook(lambda g: torch.full_like(g, float("nan")))

    def stepper(world):
        return Stepper(model=model, optimizer=opt, schedule=None, scaler=None,
                       device=torch.device("cpu"), amp_dtype=None, channels_last=False,
                       accum_steps=1, label_smoothing=0.0, max_bad_steps=5,
                       dist=DistInfo(0, world, 0), probe=head)
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    s = stepper(2)
    meter = Meter(torch.device("cpu"))
    assert _optimizer_step(s, x, y, meter) is False
    assert s.bad_steps == 1
    assert meter.sums.tolist() == [0.0, 0.0, 0.0, 0.0]  # the skipped batch is not counted
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # one process: a finite loss with non-finite gradients is skipped as well
    s1 = stepper(1)
    _optimizer_step(s1, x, y, Meter(torch.device("cpu")))
    assert s1.bad_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))

"""Training-loop behaviour: precision paths, accumulation, the non-finite guard, warm-up hook."""

import os
import re

import pytest
import torch

from resnet_train.cli import train as train_cli
from resnet_train.runtime import resolve_amp, resolve_channels_last

from .helpers import records, tiny


def last(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)


def metrics(run_dir):
    return records(run_dir, "epoch")


@pytest.mark.parametrize("amp, layout, dtype, epochs", [
    ("bf16", "true", torch.bfloat16, 3),
    ("none", "false", torch.float32, 1),  # the control: fp32 NCHW, as the hooks must see
])
def test_bf16_channels_last_path_trains(tmp_path, monkeypatch, amp, layout, dtype, epochs):
    """Every conv ran in the requested precision on the requested memory layout, in training
    and in evaluation: forward hooks on the Conv2d modules of the model the trainer builds."""
    import resnet_train.models as models
    real, seen = models.build_model, []

    def hook(conv, inputs, output):
        x, w = inputs[0], conv.weight
        seen.append({"training": conv.training, "dtype": output.dtype,
                     "nhwc": x.is_contiguous(memory_format=torch.channels_last),
                     "nchw": x.is_contiguous(),
                     # a 1x1 kernel is contiguous in both layouts: only larger ones tell
                     "w_nhwc": w.is_contiguous(memory_format=torch.channels_last)
                     if w.shape[-1] > 1 else layout == "true"})

    def build_model(*args, **kwargs):
        model = real(*args, **kwargs)
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(hook)
        return model

    monkeypatch.setattr(models, "build_model", build_model)
    run_dir = str(tmp_path / "bf16")
    assert train_cli.main(tiny(run_dir, f"train.amp={amp}", f"train.channels_last={layout}",
                               f"train.epochs={epochs}", "optim.lr=0.1")) == 0
    assert {r["training"] for r in seen} == {True, False}  # training steps and validation
    assert {r["dtype"] for r in seen} == {dtype}
    nhwc = layout == "true"
    assert {(r["nhwc"], r["nchw"], r["w_nhwc"]) for r in seen} == {(nhwc, not nhwc, nhwc)}
    recs = metrics(run_dir)
    if epochs > 1:
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
    if torch.cuda.is_available():  # the real GPU's choice (mocked GPUs: the test below)
        gpu = torch.device("cuda", 0)
        native = torch.cuda.get_device_capability(gpu)[0] >= 8
        assert resolve_amp("auto", gpu) is (torch.bfloat16 if native else None)


@pytest.mark.parametrize("capability,amp", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                            ((7, 0), None), ((7, 5), None)],
                         ids=["a100", "h100", "v100", "t4"])
def test_auto_amp_on_cuda_takes_bf16_only_where_the_gpu_has_it(monkeypatch, capability, amp):
    """torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (V100, T4):
    auto asks for bf16 units (compute capability 8.0 or newer), on the run's device."""
    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: asked.append(device) or capability)
    assert resolve_amp("auto", torch.device("cuda", 1)) is amp
    assert asked == [torch.device("cuda", 1)]


def test_a_skipped_non_finite_step_stays_out_of_the_train_metrics(tmp_path, capsys,
                                                                  monkeypatch):
    """One poisoned batch: its step is skipped, counted and reported, and the epoch's train
    loss is the mean over the other batches (not NaN). Every batch poisoned (with room in
    train.max_bad_steps): the epoch has no train figures, not zeros."""
    from resnet_train.data import prep
    real, calls = prep.DevicePrep.__call__, []
    poison = {3}

    def poisoned(self, x, gen=None):
        out = real(self, x, gen)
        if gen is not None:  # training batches only
            calls.append(1)
            if len(calls) in poison:
                out = out.clone().fill_(float("nan"))
        return out
    monkeypatch.setattr(prep.DevicePrep, "__call__", poisoned)
    run_dir = str(tmp_path / "skip")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    out = capsys.readouterr().out
    rec = [r for r in metrics(run_dir) if r.get("kind") == "epoch"][0]
    assert rec["skipped_steps"] == 1
    assert 0 < rec["train_loss"] < 10 and 0 <= rec["train_top1"] <= 1
    assert "skipped 1 optimizer steps with a non-finite loss" in out
    ckpt = last(run_dir)
    assert ckpt["global_step"] == 8 and ckpt["train_step"]["bad_run"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())

    poison.update(range(1, 9))
    calls.clear()
    run_dir = str(tmp_path / "all")
    assert train_cli.main(tiny(run_dir, "train.epochs=1", "train.max_bad_steps=20")) == 0
    out = capsys.readouterr().out
    rec = [r for r in metrics(run_dir) if r.get("kind") == "epoch"][0]
    assert rec["skipped_steps"] == 8
    assert (rec["train_loss"], rec["train_top1"], rec["train_top5"]) == (None, None, None)
    assert "epoch 0: train every step skipped | val loss" in out


def test_non_finite_losses_stop_and_keep_the_last_good_checkpoint(tmp_path, capsys):
    run_dir = str(tmp_path / "nan")
    assert train_cli.main(tiny(run_dir, "train.epochs=1", "checkpoint.every_steps=1")) == 0
    good = last(run_dir)
    # Continue the same run with an absurd lr: the weights blow up within a few steps.
    code = train_cli.main(tiny(run_dir, "train.epochs=2", "checkpoint.every_steps=1",
                               "optim.lr=1e12", "train.max_bad_steps=2",
                               "checkpoint.allow_changes=[optim.lr]"))
    out = capsys.readouterr().out
    assert code == 1
    # read at the next log point (no per-step sync): at least the 2 allowed skips in a row
    assert re.search(r"error: [2-9] consecutive non-finite losses", out), out
    assert "last good checkpoint" in out
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
    assert last(a)["epoch_meter"]["sums"] == [0.0] * 5 and last(b)["epoch"] == 1
    wa, wb = last(a)["model"]["fc.weight"], last(b)["model"]["fc.weight"]
    assert not torch.equal(wa, wb)
    assert (wa - wb).norm() / wa.norm() < 0.5


def test_indivisible_accumulation_is_a_config_error(tmp_path, capsys):
    assert train_cli.main(tiny(str(tmp_path / "r"), "train.accum_steps=3")) == 2
    assert "train.accum_steps" in capsys.readouterr().err


def test_low_lr_warmup_switches_back_when_train_error_drops(tmp_path, capsys):
    """The switch is said in one line at its iteration; a warm-up still on at the first
    milestone is warned about (the run would go on at a tenth of its schedule)."""
    run_dir = str(tmp_path / "w")
    # The threshold 0.95 is crossed almost at once; 0.0 is never crossed.
    assert train_cli.main(tiny(run_dir, "train.epochs=1", "schedule.low_lr_until_error=0.95",
                               "schedule.low_lr_factor=0.1")) == 0
    state = last(run_dir)["schedule"]
    assert state["low_lr_ended_at"] is not None and state["low_lr_ended_at"] < 8
    out = capsys.readouterr().out
    assert f"note: low-lr warm-up over at iteration {state['low_lr_ended_at']}: the train " \
           f"error of the last 5 steps is below 95%" in out and "warning" not in out
    run2 = str(tmp_path / "w2")
    assert train_cli.main(tiny(run2, "train.epochs=2", "schedule.low_lr_until_error=0.0",
                               "schedule.milestones=[1]")) == 0
    assert last(run2)["schedule"]["low_lr_ended_at"] is None
    warned = [ln for ln in capsys.readouterr().out.splitlines() if "still on" in ln]
    assert warned == ["warning: the low-lr warm-up (lr x0.1 until the train error is below "
                      "0%) is still on at the first milestone (iteration 8): the run goes on "
                      "at x0.1 its schedule"]
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
    import resnet_train.runtime as runtime_mod
    monkeypatch.setattr(runtime_mod, "resolve_amp", lambda mode, device: torch.float16)
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
    # the warm-up looked after 10 steps; its window holds steps 11 and 12
    assert mid["timer"]["steps"] == 12 and mid["schedule"]["low_lr_window"][1] == 2 * 32
    assert mid["schedule"]["low_lr_ended_at"] is None
    assert train_cli.main(tiny(split, *args)) == 0
    a, b = last(whole), last(split)
    assert a["schedule"]["low_lr_ended_at"] == b["schedule"]["low_lr_ended_at"] == 15
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k




def test_precise_bn_sets_the_saved_and_validated_statistics(tmp_path):
    """train.precise_bn=K: before the epoch-end validation and save, the BN statistics are
    recomputed over the epoch's first K training batches (as trained on); the same weights
    with those statistics give the logged val metrics; the weights are not touched."""
    from resnet_train import checkpoint as ckpt_io
    from resnet_train.cli import eval as eval_cli
    from resnet_train.config import load_config
    from resnet_train.data import build_data
    from resnet_train.data.sampling import batch_generator
    from resnet_train.distributed import DistInfo
    from resnet_train.engine import precise_bn
    from resnet_train.runtime import build_model_for, resolve_runtime
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    # deterministic: on a GPU the two runs' weights are bitwise equal only so
    det = "run.deterministic=true"
    assert train_cli.main(tiny(on, "train.epochs=1", "train.precise_bn=3", det)) == 0
    assert train_cli.main(tiny(off, "train.epochs=1", det)) == 0
    a, b = (ckpt_io.load(os.path.join(d, "checkpoints", "last.pt")) for d in (on, off))
    running = [k for k in a["model"] if "running_" in k]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]
               if "running_" not in k and "num_batches" not in k)  # same weights
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in running)
    # recompute: epoch 0's first three batches through the saved weights
    cfg = load_config(None, [], base=a["config"])
    rt = resolve_runtime(cfg, 0)
    data = build_data(cfg, rt.device, 0, 1)
    model = build_model_for(cfg, data.num_classes, rt)
    model.load_state_dict(b["model"])
    gen = torch.Generator(rt.device)
    inputs = [data.train_prep(x, batch_generator(cfg.run.seed, 0, i, 0, gen))
              for i, (x, _) in zip(range(3), data.train.batches(0, 0), strict=False)]
    precise_bn(model, iter(inputs), rt, DistInfo())
    for k in running:
        torch.testing.assert_close(model.state_dict()[k], a["model"][k])
    (rec,) = records(on)
    got = eval_cli.evaluate_checkpoint(os.path.join(on, "checkpoints", "last.pt"))
    assert got["loss"] == pytest.approx(rec["val_loss"], rel=1e-5)


def test_diagnostics_log_to_tensorboard_and_leave_training_alone(tmp_path):
    """run.diagnostics_every=N: diag/grad_norm/<stage>, diag/block_norms/<block> scalars and
    diag/bn_gamma/<stage> histograms every N steps; the weights end exactly as without."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from resnet_train import checkpoint as ckpt_io
    on, off = str(tmp_path / "on"), str(tmp_path / "off")
    common = ("train.epochs=1", "run.deterministic=true")
    assert train_cli.main(tiny(on, *common, "run.diagnostics_every=3")) == 0
    assert train_cli.main(tiny(off, *common)) == 0
    a, b = (ckpt_io.load(os.path.join(d, "checkpoints", "last.pt"))["model"] for d in (on, off))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = EventAccumulator(os.path.join(on, "tb"), size_guidance={"scalars": 0,
                                                                  "histograms": 0}).Reload()
    tags = ev.Tags()
    for stage in ("stem", "layer1", "layer2", "layer3", "fc"):
        assert f"diag/grad_norm/{stage}" in tags["scalars"]
    assert [e.step for e in ev.Scalars("diag/grad_norm/layer1")] == [3, 6]  # 8 steps
    assert all(e.value > 0 for e in ev.Scalars("diag/grad_norm/fc"))
    assert "diag/block_norms/layer1.0" in tags["scalars"]
    assert {"diag/bn_gamma/stem", "diag/bn_gamma/layer3"} <= set(tags["histograms"])
    off_tags = EventAccumulator(os.path.join(off, "tb")).Reload().Tags()
    assert not any(t.startswith("diag/") for t in off_tags["scalars"] + off_tags["histograms"])


def test_step_lines_report_the_speed_of_their_own_window(tmp_path, monkeypatch):
    """A step line's images/s covers the training time since the previous step line, this
    step included, across an epoch end (validation not counted). A fake clock that ticks 1 s
    a reading: a step reads it at its start, after its batch, at a log point and at its end,
    so a window of 4 steps is 8 s from the run's start, then 9 s (the previous log step's
    tail)."""
    from types import SimpleNamespace

    from resnet_train import trainer
    clock = iter(range(10**6))
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "run.log_every=4")) == 0  # 8 steps of 32 an epoch
    rates = [r["images_per_sec"] for r in records(run_dir, "step")]
    assert rates == pytest.approx([128 / 8] + [128 / 9] * 3, rel=1e-12)
    assert [r["images_per_sec"] for r in records(run_dir)] == pytest.approx(
        [256 / 18, 256 / 18], rel=1e-12)  # the epoch's 8 steps: 6 x 2 s + 2 x 3 s


def test_an_epochs_time_includes_the_device_work_still_queued_at_its_end(tmp_path,
                                                                          monkeypatch):
    """On a GPU the step returns before its kernels run: the epoch's time ends with a device
    synchronisation, so the work still queued is the epoch's (not the validation's). A fake
    clock ticking 1 s a reading, and a fake device whose queue takes 100 s to drain."""
    from types import SimpleNamespace

    from resnet_train import trainer
    from resnet_train.runtime import Runtime
    now = [0.0]

    def perf_counter():
        now[0] += 1.0
        return now[0]
    waits = []

    def synchronize(self):
        waits.append(now[0])
        now[0] += 100.0
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=perf_counter))
    monkeypatch.setattr(Runtime, "synchronize", synchronize)
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "run.log_every=4")) == 0  # 2 epochs of 8 steps
    assert len(waits) == 2  # once an epoch, at its end
    # the 18 s of the fake clock's readings (as in the test above), plus the queue
    assert [r["epoch_seconds"] for r in metrics(run_dir)] == pytest.approx([118, 118])
    assert [r["images_per_sec"] for r in metrics(run_dir)] == pytest.approx([256 / 118] * 2)


def test_each_runs_peak_memory_is_its_own(tmp_path, monkeypatch):
    """peak_mem_gb of a run's first epoch does not include what an earlier run in the same
    process allocated (resnet-study degradation trains its networks in one process). A fake
    allocator: its peak is the largest "allocation" since its last reset."""
    from resnet_train.runtime import Runtime
    alloc = {"peak": 0.0}

    def peak_memory_gb(self):
        peak, alloc["peak"] = alloc["peak"], 0.0
        return peak
    monkeypatch.setattr(Runtime, "reset_peak_memory", lambda self: alloc.update(peak=0.0))
    monkeypatch.setattr(Runtime, "peak_memory_gb", peak_memory_gb)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert train_cli.main(tiny(first, "train.epochs=1")) == 0
    alloc["peak"] = 40.0  # the first run's last moments (its final evaluation, say)
    assert train_cli.main(tiny(second, "train.epochs=1")) == 0
    assert [r["peak_mem_gb"] for r in metrics(second)] == [0.0]


def test_runtime_reads_cuda_peak_memory_and_starts_a_new_window(monkeypatch):
    """peak_memory_gb reads the CUDA allocator's peak in GiB and resets it; a reset before
    CUDA is initialised is no call (the allocator would refuse it: a run in fp32 reaches its
    start before anything initialises CUDA); on the CPU there is no peak, and synchronize
    has nothing to wait for."""
    from resnet_train.runtime import Runtime
    calls, initialised = [], [False]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: calls.append(("sync", d)))
    gpu = Runtime(torch.device("cuda:1"), torch.bfloat16, True)
    gpu.reset_peak_memory()
    assert calls == []
    initialised[0] = True
    gpu.reset_peak_memory()
    assert gpu.peak_memory_gb() == 3.0
    gpu.synchronize()
    assert calls == [("reset", torch.device("cuda:1"))] * 2 + [("sync", torch.device("cuda:1"))]
    cpu = Runtime(torch.device("cpu"), None, False)
    cpu.synchronize()
    cpu.reset_peak_memory()
    assert cpu.peak_memory_gb() is None and len(calls) == 3

"""The step: no host synchronisation per step, the non-finite skip decided on the device."""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from resnet_train import engine, trainer
from resnet_train.cli import train as train_cli
from resnet_train.engine import STATS, Meter, TrainStep
from resnet_train.runtime import Runtime

from .helpers import tiny

# What makes the host wait for the device: reading a value (item, tolist, bool, float, int,
# numpy, cpu) and making a device tensor from host data (torch.tensor / as_tensor: a
# blocking copy on CUDA). On the CPU nothing waits, but the same calls are the syncs there.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
MAKERS = ("tensor", "as_tensor")
# The device of the step-level tests: CUDA where there is one (scripts/gpu_check.sh runs
# them there), so the on-device skip is tested on the device it is written for.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def count_host_syncs(monkeypatch):
    """Counts host reads by name while ``counts["on"]`` is truthy."""
    counts = collections.Counter()
    state = {"on": False}

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*a, **k):
            if state["on"]:
                counts[name] += 1
            return real(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    for name in READS:
        wrap(torch.Tensor, name)
    for name in MAKERS:
        wrap(torch, name)
    yield counts, state


def _measure(monkeypatch, tmp_path, *extra) -> tuple[collections.Counter, int, int]:
    """Host syncs inside the loop outside log points, epoch ends and saves; steps, log points."""
    steps, logs = [0], [0]
    with count_host_syncs(monkeypatch) as (counts, state):
        real_call = TrainStep.__call__

        def step(self, x, y):
            steps[0] += 1
            state["on"] = steps[0] > 1  # the first step may allocate and read lazily
            return real_call(self, x, y)
        monkeypatch.setattr(TrainStep, "__call__", step)
        for name in ("_end_epoch", "_log_step", "_save"):
            real = getattr(trainer.Trainer, name)

            def paused(self, *a, _real=real, _name=name, **k):
                was, state["on"] = state["on"], False
                try:
                    if _name == "_log_step":
                        logs[0] += 1
                    return _real(self, *a, **k)
                finally:
                    state["on"] = was
            monkeypatch.setattr(trainer.Trainer, name, paused)
        assert train_cli.main(tiny(str(tmp_path / "run"), "train.epochs=1",
                                   "data.train_samples=512", *extra)) == 0
    return counts, steps[0], logs[0]


@pytest.mark.parametrize("extra", [(), ("train.accum_steps=2",), ("train.amp=bf16",
                                                                   "train.channels_last=true")])
def test_no_host_sync_per_step_outside_log_points(tmp_path, monkeypatch, extra):
    """16 steps; log points every 8 (their reads are not counted): zero reads per step.
    Before this design the step read 2 (3 with accum_steps=2): bool(isfinite) and a
    torch.tensor per micro-batch for the sample count."""
    counts, steps, logs = _measure(monkeypatch, tmp_path, "run.log_every=8", *extra)
    assert steps == 16 and logs == 2
    assert sum(counts.values()) == 0, dict(counts)


def test_the_counter_sees_a_sync_in_the_step(tmp_path, monkeypatch):
    """Negative control: a step that reads a value is counted once per step."""
    real = engine.TrainStep._guarded_update

    def reading(self, loss_sum):
        good = real(self, loss_sum)
        bool(good)  # what the old step did
        return good
    monkeypatch.setattr(engine.TrainStep, "_guarded_update", reading)
    counts, steps, _ = _measure(monkeypatch, tmp_path, "run.log_every=100")
    assert counts["__bool__"] == steps - 1


def test_fp16_scaler_path_reads_nothing_per_step(tmp_path, monkeypatch):
    """GradScaler + fused SGD: the scaler's found_inf goes to the kernel, no .item()."""
    import resnet_train.runtime as runtime_mod
    monkeypatch.setattr(runtime_mod, "resolve_amp", lambda mode, device: torch.float16)
    counts, steps, _ = _measure(monkeypatch, tmp_path, "run.log_every=100")
    assert steps == 16 and sum(counts.values()) == 0, dict(counts)


def _tiny_step(world: int = 1, scaler=None, accum: int = 1, bn: bool = False,
               smoothing: float = 0.0):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)] if bn else []
    model = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model.to(DEV)(torch.randn(2, 3, 2, 2, device=DEV))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    head = list(model.parameters())[-1]
    rt = Runtime(DEV, None, False)
    step = TrainStep(model, opt, scaler, rt, accum, smoothing, probe=head,
                     buffers=list(model.buffers()), distributed=world > 1)
    return model, opt, step, head


def _batch(n: int = 4):
    return torch.randn(n, 3, 2, 2, device=DEV), torch.arange(n, device=DEV) % 3


def _snapshot(model):
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def test_a_poisoned_step_changes_nothing_and_is_counted():
    """A NaN input: weights, momentum and BatchNorm statistics stay exactly as they were;
    the stats say skipped (and count nothing else); a good step then moves everything."""
    model, opt, step, _ = _tiny_step(bn=True)
    x, y = _batch()
    step(x, y)  # one good step: momentum buffers are non-zero from here
    before = _snapshot(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    stats = step(torch.full_like(x, float("nan")), y)
    assert stats.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))
    assert all(torch.equal(m, opt.state[p]["momentum_buffer"])
               for m, p in zip(momentum, model.parameters(), strict=True))
    assert float(step.bad_run) == 1 and float(step.peak_bad_run) == 1
    stats = step(x, y)
    assert stats[3].item() == 4 and stats[4].item() == 0 and float(step.bad_run) == 0
    assert float(step.peak_bad_run) == 1  # the window still remembers the run
    step.reset_peak()
    assert float(step.peak_bad_run) == 0
    assert not torch.equal(before[0], model[0].weight)


def test_ddp_ranks_skip_a_poisoned_step_alike():
    """Under DDP a NaN loss on another rank reaches this rank only through the averaged
    gradients: the head gradient decides, although the local loss is finite. One process:
    a finite loss with non-finite gradients is skipped as well."""
    for world in (2, 1):
        model, _, step, head = _tiny_step(world)
        # what the all-reduce would deliver when another rank's loss was NaN
        head.register_hook(lambda g: torch.full_like(g, float("nan")))
        before = _snapshot(model)
        stats = step(*_batch())
        assert stats[4].item() == 1 and stats[3].item() == 0
        assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))


def test_fp16_scaler_skip_is_the_scalers_decision():
    """With a GradScaler the step is skipped when the scaler found inf/nan in any gradient
    (from the all-reduced gradients, so alike on every rank); its scale halves."""
    scaler = torch.amp.GradScaler(DEV.type)
    model, _, step, head = _tiny_step(2, scaler=scaler)
    poison = {"on": True}
    head.register_hook(lambda g: torch.full_like(g, float("nan")) if poison["on"] else g)
    x, y = _batch()
    before = _snapshot(model)
    assert step(x, y)[4].item() == 1 and scaler.get_scale() == 2.0 ** 15
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))
    poison["on"] = False
    assert step(x, y)[4].item() == 0 and float(step.bad_run) == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, _snapshot(model), strict=True))


def test_accumulated_step_counts_every_micro_batch():
    _, _, step, _ = _tiny_step(accum=2)
    stats = step(*_batch(8))
    assert stats[3].item() == 8 and 0 <= stats[1].item() <= stats[2].item() <= 8


def test_meter_reads_means_and_extras_in_one_go():
    m = Meter(torch.device("cpu"))
    m.add(torch.tensor([6.0, 2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    m.add(torch.tensor([2.0, 1.0, 3.0, 4.0, 0.0], dtype=torch.float64))
    from resnet_train.distributed import DistInfo
    v = m.read(DistInfo(), (torch.tensor(5.0), 7))
    assert (v["loss"], v["top1"], v["top5"], v["n"], v["skipped"]) == (1.0, 3 / 8, 6 / 8, 8, 1)
    assert v["extra"] == [5.0, 7.0]
    assert len(STATS) == 5


def test_precise_bn_is_the_plain_average_of_the_batches_statistics():
    from resnet_train.distributed import DistInfo
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.1)
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    bn.running_mean.fill_(7.0)  # stale values, to be replaced
    weights = [p.clone() for p in model.parameters()]
    inputs = [torch.randn(8, 3, 10, 10) * (i + 1) + i for i in range(3)]
    rt = Runtime(torch.device("cpu"), None, False)
    assert engine.precise_bn(model, iter(inputs), rt, DistInfo()) == 3
    with torch.no_grad():
        outs = [conv(x) for x in inputs]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    vars_ = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, vars_)
    assert bn.momentum == 0.1 and not model.training  # put back as found
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_grad_norms_per_stage_are_the_steps_gradients():
    """With want_grad_norms the step keeps each group's gradient norm (before zero_grad);
    off, it computes nothing."""
    model, opt, step, _ = _tiny_step(bn=True)
    groups = engine.stage_groups(model)
    assert sorted(groups) == ["0", "1", "3"]  # top-level names of the Sequential
    step.grad_groups = groups
    x, y = _batch()
    import copy
    twin = copy.deepcopy(model)
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    expect = {k: torch.linalg.vector_norm(torch.cat(
        [p.grad.flatten() for n, p in twin.named_parameters() if n.split(".")[0] == k]))
        for k in groups}
    step(x, y)
    assert step.grad_norms == {}  # not asked: nothing computed
    model.load_state_dict(twin.state_dict())  # back to the twin's weights and statistics
    step.want_grad_norms = True
    opt.state.clear()
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    step(x, y)
    assert set(step.grad_norms) == set(groups)
    for k, v in expect.items():
        torch.testing.assert_close(step.grad_norms[k], v)


def test_a_skipped_step_counts_once_over_ranks_whatever_the_world_size(monkeypatch):
    """Every rank skips a step from the same all-reduced gradients; only one rank counts
    it, so the sum over ranks is one skip, also after a resume at another world size (the
    saved sums are gathered onto rank 0). Counting it on every rank read 8 on 8 GPUs, and
    a division by the world at read time would be wrong after such a resume."""
    model, _, step, head = _tiny_step(2)
    step.skip_weight = 0.0  # as built with counts_skips=False (not rank 0)
    head.register_hook(lambda g: torch.full_like(g, float("nan")))
    stats = step(*_batch())
    assert stats[4].item() == 0 and float(step.bad_run) == 1  # skipped, counted elsewhere
    from resnet_train import distributed as dist_utils
    from resnet_train.distributed import DistInfo
    rank0 = torch.tensor([6.0, 2.0, 3.0, 4.0, 1.0], dtype=torch.float64)
    others = torch.tensor([6.0, 2.0, 3.0, 4.0, 0.0], dtype=torch.float64)
    for world in (2, 8):  # the all-reduce of rank 0's sums and world - 1 others'
        monkeypatch.setattr(dist_utils, "all_reduce_sum",
                            lambda t, dev, info, w=world: (t + (w - 1) * (t - rank0 + others))
                            .tolist())
        m = Meter(torch.device("cpu"))
        m.add(rank0)
        v = m.read(DistInfo(rank=0, world=world, local_rank=0))
        assert (v["n"], v["skipped"]) == (4 * world, 1)


def test_the_timer_window_spans_an_epoch_end_and_a_resume():
    t = engine.Timer(wall=6.0, images=128)
    assert t.window_rate(8.0) == 16.0          # 128 images in the first 8 s of the epoch
    t.images, t.wall = 256, 12.0
    t.reset()                                  # the epoch ends 4 s and 128 images later
    saved = t.state_dict()
    t = engine.Timer()
    t.load_state_dict(saved)
    t.images = 64
    assert t.window_rate(4.0) == 192 / 8.0     # 128 + 64 images in 4 + 4 s
    old = engine.Timer()                       # a checkpoint from before the window
    old.load_state_dict({"wall": 3.0, "data_wait": 0.0, "steps": 2, "images": 64})
    assert old.window_rate(4.0) == 16.0


@pytest.mark.parametrize("accum", [1, 2])
def test_with_label_smoothing_the_logged_loss_is_the_plain_cross_entropy(accum):
    """The objective is smoothed (its gradients), the loss in the stats is the plain
    cross-entropy of the same logits, as the validation loss; without smoothing both are
    the objective."""
    import torch.nn.functional as F
    torch.manual_seed(1)
    x, y = _batch(8)
    model, _, step, _ = _tiny_step(accum=accum, smoothing=0.1)
    with torch.no_grad():
        logits = model(x)
    stats = step(x, y)
    assert stats[0].item() == pytest.approx(F.cross_entropy(logits, y, reduction="sum").item(),
                                            rel=1e-5)
    smoothed = F.cross_entropy(logits, y, label_smoothing=0.1, reduction="sum").item()
    assert abs(stats[0].item() - smoothed) > 0.01  # (the two differ on these logits)
    model, _, step, _ = _tiny_step(accum=accum)
    assert step(x, y)[0].item() == pytest.approx(
        F.cross_entropy(logits, y, reduction="sum").item(), rel=1e-5)

"""lr schedules against their closed forms and torch's schedulers; param groups; optimizer."""

import io
import math

import pytest
import torch
from torch import nn

from resnet_train.config import load_config
from resnet_train.errors import ConfigError
from resnet_train.optim import (LRSchedule, base_lr, build_optimizer, param_groups,
                                total_steps)


def make(*overrides, spe=10, total=None):
    """(cfg, optimizer, schedule) for a one-parameter model."""
    cfg = load_config(None, list(overrides))
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = LRSchedule(cfg, opt, spe, total if total is not None else total_steps(cfg, spe))
    return cfg, opt, sched


def torch_lrs(make_scheduler, epochs, lr=0.1):
    """Epoch-granularity lrs of a torch scheduler stepped once per epoch."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sch = make_scheduler(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return out


def roundtrip(state):
    buf = io.BytesIO()
    torch.save({"schedule": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["schedule"]


# --------------------------------------------------------------------------- closed forms


def test_constant():
    _, _, s = make("schedule.name=constant", "optim.lr=0.05", spe=7)
    assert all(s.lr_at(i) == 0.05 for i in (0, 1, 6, 7, 500, 10_000))


def test_step_epoch_unit_closed_form_and_torch():
    _, _, s = make("schedule.name=step", "schedule.step_size=3", "schedule.gamma=0.5",
                   "train.epochs=12", spe=13)
    for i in range(12 * 13):
        assert s.lr_at(i) == pytest.approx(0.1 * 0.5 ** math.floor(i / 13 / 3), rel=1e-12)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 12)
    assert [s.lr_at(e * 13) for e in range(12)] == pytest.approx(ref, rel=1e-12)
    # the last iteration of epoch 2 is still undecayed, the first of epoch 3 is decayed
    assert s.lr_at(3 * 13 - 1) == pytest.approx(0.1) and s.lr_at(3 * 13) == pytest.approx(0.05)


def test_step_iter_unit():
    _, _, s = make("schedule.name=step", "schedule.unit=iter", "schedule.step_size=100", spe=391)
    for i in (0, 99, 100, 199, 200, 1234):
        assert s.lr_at(i) == pytest.approx(0.1 * 0.1 ** (i // 100), rel=1e-12)


def test_multistep_cifar_iterations():
    # He et al. 2015 CIFAR: lr 0.1, /10 at 32k and 48k iterations, stop at 64k; 391 it/epoch.
    cfg, _, s = make("schedule.name=multistep", "schedule.unit=iter",
                     "schedule.milestones=[32000,48000]", "train.iterations=64000", spe=391)
    assert total_steps(cfg, 391) == 64000 and s.total_steps == 64000
    expected = {0: 0.1, 391: 0.1, 31999: 0.1, 32000: 0.01, 32001: 0.01, 47999: 0.01,
                48000: 0.001, 63999: 0.001}
    for i, lr in expected.items():
        assert s.lr_at(i) == pytest.approx(lr, rel=1e-12), i
    for i in range(0, 64000, 97):
        assert s.lr_at(i) == pytest.approx(0.1 * 0.1 ** ((i >= 32000) + (i >= 48000)), rel=1e-12)


def test_multistep_epoch_unit_matches_torch():
    _, _, s = make("schedule.name=multistep", "schedule.milestones=[3,7,8]",
                   "schedule.gamma=0.2", "train.epochs=10", spe=391)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 7, 8], 0.2), 10)
    assert [s.lr_at(e * 391) for e in range(10)] == pytest.approx(ref, rel=1e-12)
    # within an epoch the lr is that epoch's (fractional epoch = step / steps_per_epoch)
    assert [s.lr_at(e * 391 + 390) for e in range(10)] == pytest.approx(ref, rel=1e-12)


def test_cosine_matches_torch_and_closed_form():
    _, _, s = make("schedule.name=cosine", "schedule.min_lr=0.001", "train.epochs=20", spe=50)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 20, eta_min=0.001), 20)
    assert [s.lr_at(e * 50) for e in range(20)] == pytest.approx(ref, rel=1e-9)
    for i in range(0, 1000, 7):  # per iteration, not per epoch
        want = 0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * i / 1000)) / 2
        assert s.lr_at(i) == pytest.approx(want, rel=1e-12)
    assert s.lr_at(500) == pytest.approx((0.1 + 0.001) / 2)
    assert s.lr_at(1000) == pytest.approx(0.001) and s.lr_at(5000) == pytest.approx(0.001)


# --------------------------------------------------------------------------- warm-up


def test_warmup_matches_linear_lr_per_iteration():
    _, _, s = make("schedule.name=constant", "schedule.warmup=2", "schedule.warmup_unit=epoch",
                   "schedule.warmup_start_factor=0.25", spe=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=20)
    for i in range(30):
        assert s.lr_at(i) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), i
        opt.step()
        ref.step()
    assert s.lr_at(0) == pytest.approx(0.025)             # start
    assert s.lr_at(10) == pytest.approx(0.1 * 0.625)      # middle
    assert s.lr_at(19) == pytest.approx(0.1 * (0.25 + 0.75 * 19 / 20))
    assert s.lr_at(20) == pytest.approx(0.1)              # end


def test_constant_warmup_matches_torch_sequential_constant_then_multistep():
    """He et al. 2016: lr 0.01 for the first 400 iterations, then 0.1, / 10 at 32k, 48k
    (the milestones count from iteration 0). Reference: torch's ConstantLR composed with
    MultiStepLR, per iteration (scaled down 100x: 4, 320, 480)."""
    _, _, s = make("schedule.name=multistep", "schedule.unit=iter",
                   "schedule.milestones=[320,480]", "schedule.warmup=4",
                   "schedule.warmup_unit=iter", "schedule.warmup_shape=constant",
                   "schedule.warmup_start_factor=0.1", spe=10)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.ConstantLR(opt, factor=0.1, total_iters=4),
        torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[320, 480], gamma=0.1)])
    for i in range(600):
        assert s.lr_at(i) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), i
        opt.step()
        ref.step()
    assert s.lr_at(3) == pytest.approx(0.01) and s.lr_at(4) == pytest.approx(0.1)


def test_warmup_composes_with_multistep():
    # The warm-up multiplies the schedule's factor; the milestones are not shifted.
    _, _, s = make("schedule.name=multistep", "schedule.unit=iter", "schedule.milestones=[50,200]",
                   "schedule.warmup=100", "schedule.warmup_unit=iter",
                   "schedule.warmup_start_factor=0.1", spe=10)
    assert s.lr_at(0) == pytest.approx(0.01)
    assert s.lr_at(49) == pytest.approx(0.1 * (0.1 + 0.9 * 0.49))
    assert s.lr_at(50) == pytest.approx(0.01 * (0.1 + 0.9 * 0.50))
    assert s.lr_at(100) == pytest.approx(0.01)
    assert s.lr_at(199) == pytest.approx(0.01) and s.lr_at(200) == pytest.approx(0.001)


def test_warmup_composes_with_cosine():
    # The cosine starts at the end of the warm-up, from the peak lr, and ends at total_steps.
    _, _, s = make("schedule.name=cosine", "schedule.warmup=1", "schedule.warmup_start_factor=0",
                   "train.epochs=11", spe=100)
    assert s.lr_at(0) == 0.0
    assert s.lr_at(50) == pytest.approx(0.05)
    assert s.lr_at(100) == pytest.approx(0.1)
    for i in range(100, 1100, 13):
        want = 0.1 * (1 + math.cos(math.pi * (i - 100) / 1000)) / 2
        assert s.lr_at(i) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert s.lr_at(600) == pytest.approx(0.05)
    assert s.lr_at(1100) == pytest.approx(0.0, abs=1e-15)


# --------------------------------------------------------------------------- plateau


def plateau(*extra, patience=2, threshold=0.01):
    return make("schedule.name=plateau", f"schedule.patience={patience}",
                f"schedule.threshold={threshold}", "schedule.gamma=0.1", *extra, spe=5)[2]


def test_plateau_decays_after_patience_plus_one_bad_epochs():
    s = plateau(patience=2)
    s.on_epoch_end(0, 0.5)                  # first epoch always improves on inf
    for epoch in (1, 2):
        s.on_epoch_end(epoch, 0.5)
        assert s.lr_at(100) == pytest.approx(0.1), epoch
    s.on_epoch_end(3, 0.5)                  # third non-improving epoch = patience + 1
    assert s.lr_at(100) == pytest.approx(0.01)
    for epoch in (4, 5):                    # the counter restarts after a decay
        s.on_epoch_end(epoch, 0.5)
        assert s.lr_at(100) == pytest.approx(0.01)
    s.on_epoch_end(6, 0.5)
    assert s.lr_at(100) == pytest.approx(0.001)


def test_plateau_threshold_is_absolute():
    s = plateau(patience=0, threshold=0.01)
    s.on_epoch_end(0, 0.50)
    s.on_epoch_end(1, 0.489)                # improves by 0.011 > 0.01: counts as better
    assert s.lr_at(0) == pytest.approx(0.1)
    s.on_epoch_end(2, 0.481)                # improves by only 0.008: a bad epoch
    assert s.lr_at(0) == pytest.approx(0.01)


def test_plateau_ignores_missing_and_repeated_epochs():
    s = plateau(patience=0)
    s.on_epoch_end(0, 0.5)
    s.on_epoch_end(1, None)                 # no validation this epoch
    s.on_epoch_end(0, 0.9)                  # already counted
    assert s.lr_at(0) == pytest.approx(0.1)
    s.on_epoch_end(2, 0.9)
    assert s.lr_at(0) == pytest.approx(0.01)


def test_plateau_min_lr_floor():
    s = plateau("schedule.min_lr=0.0005", patience=0)
    lrs = []
    for epoch in range(6):
        s.on_epoch_end(epoch, 0.5)
        lrs.append(s.lr_at(0))
    assert lrs == pytest.approx([0.1, 0.01, 0.001, 0.0005, 0.0005, 0.0005])


def test_plateau_matches_reduce_lr_on_plateau():
    s = plateau("schedule.min_lr=0.00002", patience=3, threshold=0.005)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=0.1, patience=3, threshold=0.005, threshold_mode="abs",
        min_lr=0.00002)
    g = torch.Generator().manual_seed(0)
    err = 0.9
    for epoch in range(80):
        err = max(0.0, err - 0.02 * float(torch.rand(1, generator=g)) + 0.004)
        s.on_epoch_end(epoch, err)
        ref.step(err)
        assert s.lr_at(0) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), epoch
    assert opt.param_groups[0]["lr"] < 0.1  # the sequence did exercise decays


# --------------------------------------------------------------------------- resume


def test_state_round_trip_mid_warmup():
    overrides = ("schedule.name=multistep", "schedule.milestones=[2]", "schedule.warmup=3",
                 "train.epochs=4")
    _, _, a = make(*overrides, spe=10)
    assert [a.lr_at(i) for i in range(15)] != pytest.approx([0.1] * 15)
    state = roundtrip(a.state_dict())
    _, opt_b, b = make(*overrides, spe=10)
    b.load_state_dict(state)
    for i in range(15, 40):                 # resumed at iteration 15, mid warm-up
        assert b.apply(i) == a.lr_at(i)
        assert opt_b.param_groups[0]["lr"] == a.lr_at(i)


def test_state_round_trip_mid_plateau():
    s = plateau(patience=2)
    for epoch, err in enumerate([0.5, 0.4, 0.45, 0.45]):   # two bad epochs so far
        s.on_epoch_end(epoch, err)
    state = s.state_dict()
    loaded = roundtrip(state)
    assert loaded == state
    resumed, fresh = plateau(patience=2), plateau(patience=2)
    resumed.load_state_dict(loaded)
    for epoch, err in zip(range(4, 10), [0.45, 0.44, 0.42, 0.42, 0.41, 0.3], strict=True):
        for sched in (s, resumed, fresh):
            sched.on_epoch_end(epoch, err)
        assert resumed.lr_at(0) == s.lr_at(0), epoch
    # without the restored state the decays come at different epochs
    assert fresh.lr_at(0) != s.lr_at(0)


def test_state_dict_is_plain_python():
    s = plateau()
    for k, v in s.state_dict().items():
        if k == "low_lr_window":  # the warm-up's (correct, n) sums since its last look
            assert [type(x) for x in v] == [float, float]
        else:
            assert v is None or type(v) in (int, float, bool), k
    with pytest.raises(Exception, match="plateau_best"):
        s.load_state_dict({k: v for k, v in s.state_dict().items() if k != "plateau_best"})


# --------------------------------------------------------------------------- ResNet-110 warm-up


def resnet110(**kw):
    return make("schedule.name=multistep", "schedule.unit=iter",
                "schedule.milestones=[32000,48000]", "schedule.low_lr_until_error=0.8",
                "schedule.low_lr_factor=0.1", "train.iterations=64000", spe=391, **kw)[2]


def feed(s, last, error, images=100):
    """Five steps ending at iteration ``last`` with the given training error (engine.STATS);
    the warm-up looks at iterations where (step + 1) % 5 == 0."""
    sums = []

    def one_process(values):
        sums.append(values)
        return values
    correct = round((1 - error) * images)
    for step in range(last - 4, last + 1):
        stats = torch.tensor([1.0, correct, correct, images, 0.0], dtype=torch.float64)
        s.observe(step, stats, one_process)
    return sums


def test_resnet110_low_lr_until_error_below_threshold():
    s = resnet110()
    assert s.apply(0) == pytest.approx(0.01)
    assert feed(s, 104, 0.9) == [[50.0, 500.0]]  # the window of the last five steps
    feed(s, 204, 0.8)                       # equal is not below
    assert s.lr_at(205) == pytest.approx(0.01)
    feed(s, 399, 0.79)                      # falls below after iteration 399
    assert s.lr_at(399) == pytest.approx(0.01)
    assert s.lr_at(400) == pytest.approx(0.1)
    assert feed(s, 504, 0.95) == []         # it never switches back, nor looks again
    assert s.lr_at(505) == pytest.approx(0.1)
    # the normal schedule is not shifted by the low phase
    assert s.lr_at(31999) == pytest.approx(0.1) and s.lr_at(32000) == pytest.approx(0.01)


def test_resnet110_window_only_counts_since_the_last_look():
    s = resnet110()
    feed(s, 4, 0.95)
    for step in (5, 6):  # two very good steps, then a save mid-window
        s.observe(step, torch.tensor([1.0, 100, 100, 100, 0.0], dtype=torch.float64),
                  lambda v: v)
    state = roundtrip(s.state_dict())
    assert state["low_lr_window"] == [200.0, 200.0]
    resumed = resnet110()
    resumed.load_state_dict(state)
    seen = []
    for step in (7, 8, 9):
        resumed.observe(step, torch.tensor([1.0, 0, 0, 100, 0.0], dtype=torch.float64),
                        lambda v: seen.append(v) or v)
    assert seen == [[200.0, 500.0]] and resumed.lr_at(10) == pytest.approx(0.1)  # 60% error


def test_resnet110_state_round_trip():
    s = resnet110()
    feed(s, 399, 0.7)
    resumed, fresh = resnet110(), resnet110()
    resumed.load_state_dict(roundtrip(s.state_dict()))
    assert resumed.lr_at(400) == pytest.approx(0.1) and resumed.lr_at(300) == pytest.approx(0.01)
    assert fresh.lr_at(400) == pytest.approx(0.01)


def test_no_low_lr_phase_by_default():
    _, _, s = make("schedule.name=constant")
    assert feed(s, 4, 0.99) == []
    assert s.lr_at(0) == pytest.approx(0.1)


# --------------------------------------------------------------------------- optimizer


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4, 2))


def test_param_groups_no_decay_on_bn_and_biases():
    m = tiny_model()
    decay, no_decay = param_groups(m, 5e-4, no_decay_bn_bias=True)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0

    def ids(ps):
        return {id(p) for p in ps}

    assert ids(decay["params"]) == ids([m[0].weight, m[3].weight])
    assert ids(no_decay["params"]) == ids([m[1].weight, m[1].bias, m[3].bias])

    (only,) = param_groups(m, 5e-4, no_decay_bn_bias=False)
    assert only["weight_decay"] == 5e-4 and ids(only["params"]) == ids(m.parameters())

    m[1].requires_grad_(False)              # frozen parameters are left out
    _, no_decay = param_groups(m, 5e-4, no_decay_bn_bias=True)
    assert ids(no_decay["params"]) == ids([m[3].bias])


def test_build_optimizer():
    cfg = load_config(None, ["optim.lr=0.2", "optim.momentum=0.8", "optim.nesterov=true",
                             "optim.weight_decay=0.001", "optim.no_decay_bn_bias=true"])
    opt = build_optimizer(tiny_model(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.001, 0.0]
    for g in opt.param_groups:
        assert g["lr"] == 0.2 and g["momentum"] == 0.8 and g["nesterov"] is True


def test_nesterov_without_momentum_is_a_config_error():
    # Caught when the config is loaded, before anything is built.
    with pytest.raises(ConfigError, match="optim.nesterov"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])


def test_linear_lr_scaling():
    cfg = load_config(None, ["optim.lr=0.1", "data.batch_size=1024", "optim.lr_scaling=linear"])
    assert base_lr(cfg) == pytest.approx(0.4)
    opt = build_optimizer(tiny_model(), cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    s = LRSchedule(cfg, opt, 10, 100)
    assert s.lr_at(0) == pytest.approx(0.4) and s.lr_at(100 * 10) == pytest.approx(0.04)
    assert base_lr(load_config(None, ["optim.lr=0.1", "data.batch_size=1024"])) == 0.1


def test_apply_sets_every_group():
    cfg, _, _ = make("schedule.name=constant", "schedule.warmup=5", "schedule.warmup_unit=iter")
    opt = build_optimizer(tiny_model(), load_config(None, ["optim.no_decay_bn_bias=true"]))
    s = LRSchedule(cfg, opt, 10, 100)
    assert s.apply(0) == pytest.approx(0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])


def test_total_steps():
    assert total_steps(load_config(None, ["train.epochs=3"]), 391) == 1173
    cfg = load_config(None, ["train.epochs=3", "train.iterations=64000"])
    assert total_steps(cfg, 391) == 64000


@pytest.mark.parametrize("saved_nhwc", [True, False], ids=["nhwc-to-nchw", "nchw-to-nhwc"])
def test_momentum_resumed_into_another_memory_format_steps_as_the_reference(saved_nhwc):
    """A checkpoint of a channels_last run resumed with NCHW weights (or back): each
    momentum buffer takes its parameter's strides, and the fused step equals the plain
    for-loop SGD's. Before, the fused kernel paired the buffer's raw memory with the
    weight's (0.067 off after one step on the CPU; CUDA's kernel refuses the step). On CUDA
    where there is one (scripts/gpu_check.sh runs it there)."""
    from resnet_train.models import build_model
    from resnet_train.optim import load_optimizer_state
    cfg = load_config(None, ["model.arch=resnet20", "data.dataset=synthetic"])
    fmt = {True: torch.channels_last, False: torch.contiguous_format}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, device=dev), torch.randint(10, (4,), device=dev)
    saved = build_model("resnet20", 10, width=4).to(dev, memory_format=fmt[saved_nhwc])
    opt = build_optimizer(saved, cfg)
    nn.functional.cross_entropy(saved(x), y).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": saved.state_dict(), "optimizer": opt.state_dict()}, buf)

    def resume(fused: bool):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True, map_location=dev)
        model = build_model("resnet20", 10, width=4).to(dev, memory_format=fmt[not saved_nhwc])
        model.load_state_dict(ckpt["model"])
        o = build_optimizer(model, cfg)
        if not fused:
            for g in o.param_groups:
                g["fused"], g["foreach"] = False, False
        load_optimizer_state(o, ckpt["optimizer"])
        for p in model.parameters():
            assert o.state[p]["momentum_buffer"].stride() == p.stride()
        nn.functional.cross_entropy(model(x), y).backward()
        o.step()
        return model
    fused, reference = resume(True), resume(False)
    assert saved.conv1.weight.stride() != fused.conv1.weight.stride()  # (formats differ)
    for p, q in zip(fused.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

"""Model family: sizes, torchvision interop, unit op orders, shortcuts, init, norms, errors."""

from __future__ import annotations

import operator

import pytest
import torch
import torchvision
from torch import fx, nn

from resnet_train.cli import run_main
from resnet_train.errors import UserError
from resnet_train.models import (ARCH_SPECS, ARCHS, SHORTCUT_VARIANTS, UNITS, arch_family,
                                 build_model, collect_block_norms, set_report_norms)
from resnet_train.models.blocks import (BasicBlock, Bottleneck, OneLayerBlock, PadShortcut,
                                        ResidualBlock)

TV_DEPTHS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
}
CIFAR_COUNTS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
                "resnet56": 853_018, "resnet110": 1_727_962}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convs: one thread beats two on a shared 2-core box, where threads oversubscribe.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(arch: str, num_classes: int, **options) -> nn.Module:
    # Meta tensors: counting big ImageNet nets needs shapes, not memory or init time.
    with torch.device("meta"):
        return build_model(arch, num_classes, **options)


def op_kinds(module: nn.Module) -> list[str]:
    """The conv/bn/relu/add/pad sequence a forward executes, from an fx trace."""
    gm = fx.symbolic_trace(module)
    mods = dict(gm.named_modules())
    kinds = {nn.Conv2d: "conv", nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.Linear: "fc",
             nn.MaxPool2d: "maxpool", nn.AdaptiveAvgPool2d: "avgpool"}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(mods[node.target]) in kinds:
            out.append(kinds[type(mods[node.target])])
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            out.append("add")
        elif node.op == "call_function" and node.target is torch.nn.functional.pad:
            out.append("pad")
    return out


# ---------------------------------------------------------------- sizes and interop


@pytest.mark.parametrize("arch,count", TV_DEPTHS.items())
def test_imagenet_param_counts(arch, count):
    assert n_params(meta_model(arch, 1000)) == count


@pytest.mark.parametrize("arch,count", CIFAR_COUNTS.items())
def test_cifar_param_counts(arch, count):
    assert n_params(build_model(arch, 10)) == count


@pytest.mark.parametrize("arch,count,tol", [
    ("resnet1202", 19.4e6, 0.01), ("resnet164", 1.7e6, 0.03), ("resnet1001", 10.2e6, 0.03),
    ("preact_resnet164", 1.7e6, 0.03)])
def test_deep_cifar_param_counts(arch, count, tol):
    # many small modules: plain CPU tensors build faster than meta ones here
    assert abs(n_params(build_model(arch, 10)) - count) <= tol * count


def random_weights_(model: nn.Module) -> None:
    """Fill a meta-built net: He-scaled random convs, default fc, non-trivial BN statistics."""
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    # Slices of one random pool at random offsets: ~10x cheaper than sampling 60M values.
    pool = torch.randn(3 << 20, generator=gen)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n, fan_out = m.weight.numel(), m.weight[0, 0].numel() * m.out_channels
            start = int(torch.randint(0, pool.numel() - n + 1, (), generator=gen))
            m.weight.data = (pool[start:start + n] * (2 / fan_out) ** 0.5).view_as(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            # Fresh BN (gamma 1, beta 0, mean 0, var 1) would hide a swapped bn1/bn2 in eval.
            c = m.num_features
            m.weight.data = torch.rand(c, generator=gen) + 0.5
            m.bias.data = torch.randn(c, generator=gen) * 0.1
            m.running_mean = torch.randn(c, generator=gen) * 0.1
            m.running_var = torch.rand(c, generator=gen) + 0.5
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


@pytest.mark.parametrize("arch", TV_DEPTHS)
def test_torchvision_state_dict_and_outputs(arch):
    torch.manual_seed(0)
    with torch.device("meta"):  # init each net once, not twice (torchvision re-inits convs)
        tv = getattr(torchvision.models, arch)().eval()
    random_weights_(tv)
    ours = meta_model(arch, 1000).eval()  # its own init would be overwritten anyway
    ours.load_state_dict(tv.state_dict(), strict=True, assign=True)
    assert list(ours.state_dict()) == list(tv.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- every arch runs


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_forward_backward(arch):
    torch.manual_seed(0)
    imagenet = arch_family(arch) == "imagenet"
    model = build_model(arch, 7, width=8 if imagenet else 4)
    # batch 1 still gives BN >= 4 values per channel: the last maps are 2x2 and 8x8
    x = torch.randn(1, 3, 64 if imagenet else 32, 64 if imagenet else 32)
    out = model(x)
    assert out.shape == (1, 7)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.conv1.weight.grad.abs().sum() > 0


def test_arch_table_and_families():
    assert ARCHS == sorted(ARCH_SPECS)
    assert {arch_family(a) for a in ARCHS} == {"imagenet", "cifar"}
    assert arch_family("resnet50") == "imagenet" and arch_family("resnet56") == "cifar"
    assert arch_family("preact_resnet1001") == "cifar"
    assert ARCH_SPECS["preact_resnet164"].unit == "full_preact"
    assert ARCH_SPECS["plain34"].shortcut == "none"


def test_none_options_mean_defaults():
    torch.manual_seed(0)
    a = build_model("resnet20", 10)
    torch.manual_seed(0)
    b = build_model("resnet20", 10, variant=None, shortcut=None, unit=None,
                    zero_init_residual=None, width=None, in_channels=None, report_norms=None)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_width_and_in_channels():
    model = build_model("resnet20", 10, width=8, in_channels=1)
    assert model.conv1.weight.shape == (8, 1, 3, 3)
    assert model.fc.in_features == 32
    assert build_model("resnet50", 5, width=16).fc.in_features == 16 * 8 * 4


# ---------------------------------------------------------------- variant, shortcuts


def test_variant_moves_stride():
    v1 = meta_model("resnet50", 10, variant="v1").layer2[0]
    v15 = meta_model("resnet50", 10).layer2[0]
    assert (v1.conv1.stride, v1.conv2.stride) == ((2, 2), (1, 1))
    assert (v15.conv1.stride, v15.conv2.stride) == ((1, 1), (2, 2))
    assert n_params(v1) == n_params(v15)


def test_option_a_adds_no_parameters_and_pads_with_zeros():
    assert n_params(meta_model("resnet20", 10)) == n_params(meta_model("plain20", 10))
    assert n_params(meta_model("resnet34", 10, shortcut="A")) == n_params(meta_model("plain34", 10))
    assert n_params(meta_model("resnet20", 10, shortcut="B")) > n_params(meta_model("plain20", 10))
    block = BasicBlock(4, 8, 2, shortcut="A")
    assert isinstance(block.downsample, PadShortcut)
    x = torch.randn(2, 4, 6, 6)
    y = block.downsample(x)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 4:], torch.zeros(2, 4, 3, 3))


def test_shortcut_b_projects_only_on_change_and_c_everywhere():
    b = meta_model("resnet34", 10)
    c = meta_model("resnet34", 10, shortcut="C")
    blocks_b = [m for m in b.modules() if isinstance(m, ResidualBlock)]
    blocks_c = [m for m in c.modules() if isinstance(m, ResidualBlock)]
    assert sum(m.downsample is not None for m in blocks_b) == 3  # layer2..4 first blocks
    assert all(isinstance(m.downsample, nn.Sequential) for m in blocks_c)
    assert len(blocks_c) == 16


@pytest.mark.parametrize("arch,blocks", [("plain20", 9), ("plain50", 16)])
def test_plain_nets_have_no_additions(arch, blocks):
    plain = build_model(arch, 10, width=4)
    resnet = build_model(arch.replace("plain", "resnet"), 10, width=4)
    assert "add" not in op_kinds(plain)
    assert op_kinds(resnet).count("add") == blocks
    assert not any(m.downsample is not None for m in plain.modules()
                   if isinstance(m, ResidualBlock))


def test_plain_block_zeroed_branch_gives_zero():
    torch.manual_seed(0)
    plain = BasicBlock(4, 4, shortcut="none")
    resid = BasicBlock(4, 4, shortcut="B")
    for block in (plain, resid):
        nn.init.zeros_(block.bn2.weight)
    x = torch.rand(2, 4, 5, 5)
    assert torch.equal(plain(x), torch.zeros_like(x))
    assert torch.equal(resid(x), x)


# ---------------------------------------------------------------- unit op orders

BASIC_ORDER = {
    "original": "conv bn relu conv bn add relu",
    "bn_after_add": "conv bn relu conv add bn relu",
    "relu_before_add": "conv bn relu conv bn relu add",
    "relu_only_preact": "relu conv bn relu conv bn add",
    "full_preact": "bn relu conv bn relu conv add",
}
BOTTLENECK_ORDER = {
    "original": "conv bn relu conv bn relu conv bn add relu",
    "bn_after_add": "conv bn relu conv bn relu conv add bn relu",
    "relu_before_add": "conv bn relu conv bn relu conv bn relu add",
    "relu_only_preact": "relu conv bn relu conv bn relu conv bn add",
    "full_preact": "bn relu conv bn relu conv bn relu conv add",
}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_op_order(unit):
    assert op_kinds(BasicBlock(8, 8, unit=unit)) == BASIC_ORDER[unit].split()
    assert op_kinds(Bottleneck(16, 4, unit=unit)) == BOTTLENECK_ORDER[unit].split()


FIG4 = {  # IM Fig. 4, written out with the block's own layers: the reference of UNITS
    "original": lambda b, x, r: r(b.bn2(b.conv2(r(b.bn1(b.conv1(x))))) + x),
    "bn_after_add": lambda b, x, r: r(b.bn2(b.conv2(r(b.bn1(b.conv1(x)))) + x)),
    "relu_before_add": lambda b, x, r: r(b.bn2(b.conv2(r(b.bn1(b.conv1(x)))))) + x,
    "relu_only_preact": lambda b, x, r: b.bn2(b.conv2(r(b.bn1(b.conv1(r(x)))))) + x,
    "full_preact": lambda b, x, r: b.conv2(r(b.bn2(b.conv1(r(b.bn1(x)))))) + x,
}


@pytest.mark.parametrize("unit", UNITS)
def test_unit_equals_its_fig4_formula(unit):
    torch.manual_seed(0)
    block = BasicBlock(8, 8, unit=unit).train()
    for m in block.modules():  # non-trivial BN affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(block(x), FIG4[unit](block, x, torch.relu))


def test_projection_block_orders():
    # the projection (conv, + BN unless full pre-activation) runs after the branch
    assert op_kinds(BasicBlock(4, 8, 2)) == "conv bn relu conv bn conv bn add relu".split()
    assert op_kinds(BasicBlock(4, 8, 2, shortcut="A")) == \
        "conv bn relu conv bn pad add relu".split()
    # full pre-activation shares the first BN-ReLU with a stage's first (projecting) unit
    shared = Bottleneck(16, 8, 2, unit="full_preact", preact="shared")
    assert op_kinds(shared) == "bn relu conv bn relu conv bn relu conv conv add".split()
    omit = Bottleneck(16, 8, 1, unit="full_preact", preact="omit")
    assert op_kinds(omit) == "conv bn relu conv bn relu conv conv add".split()


@pytest.mark.parametrize("unit", ["relu_only_preact", "full_preact"])
@pytest.mark.parametrize("arch", ["resnet164", "resnet50", "resnet20"])
def test_projection_shortcut_is_preactivated(arch, unit):
    # IM appendix: with pre-activation (Fig. 4d, 4e) the projection shortcuts are
    # pre-activated too; the projection conv reads the unit's own pre-activation of its input
    torch.manual_seed(0)
    model = build_model(arch, 10, width=4, unit=unit, shortcut="B").train()
    seen = {}

    def block_input(block, inputs):
        seen[block] = {"x": inputs[0]}

    def projection_input(block, conv, inputs):
        seen[block]["proj"] = inputs[0]

    blocks = [m for m in model.modules()
              if isinstance(m, ResidualBlock) and m.downsample is not None]
    for block in blocks:
        block.register_forward_pre_hook(block_input)
        block.downsample[0].register_forward_pre_hook(
            lambda conv, inputs, block=block: projection_input(block, conv, inputs))
    size = 64 if arch_family(arch) == "imagenet" else 32
    model(torch.randn(2, 3, size, size))
    checked = 0
    for block in blocks:
        x, proj = seen[block]["x"], seen[block]["proj"]
        assert proj.min() >= 0
        if x.min() < 0:  # the output of a unit without a ReLU after its addition
            assert block.pre_ops == (("relu",) if unit == "relu_only_preact" else ("bn1", "relu"))
            expected = torch.relu(x) if unit == "relu_only_preact" else _pre(block, x)
            torch.testing.assert_close(proj, expected, rtol=0, atol=0)
            checked += 1
    assert checked >= 2  # the later stages' first units


def test_preact_nets_stem_and_head():
    cifar = op_kinds(build_model("preact_resnet110", 10, width=4))
    # bare conv stem, then the first unit's shared BN-ReLU: one BN-ReLU before the first conv
    assert cifar[:4] == ["conv", "bn", "relu", "conv"]
    assert cifar[-5:] == ["add", "bn", "relu", "avgpool", "fc"]
    imagenet = op_kinds(build_model("preact_resnet18", 10, width=8))
    # fb.resnet.torch: the stem's BN-ReLU precedes the max pool, layer1.0 starts with conv
    assert imagenet[:5] == ["conv", "bn", "relu", "maxpool", "conv"]
    assert imagenet[-5:] == ["add", "bn", "relu", "avgpool", "fc"]
    original = op_kinds(build_model("resnet20", 10, width=4))
    assert original[:4] == ["conv", "bn", "relu", "conv"]
    assert original[-4:] == ["add", "relu", "avgpool", "fc"]


# ---------------------------------------------------------------- IM Table 1 shortcut variants


def _gate(block, x):
    return torch.sigmoid(block.gate(x))


# (F, h, block, x) -> the sum before the original unit's final ReLU (IM Fig. 2)
VARIANT_SUMS = {
    "scale_shortcut": lambda f, h, b, x: f + 0.5 * h,
    "scale_both": lambda f, h, b, x: 0.5 * f + 0.5 * h,
    "exclusive_gating": lambda f, h, b, x: _gate(b, x) * f + (1 - _gate(b, x)) * h,
    "exclusive_gating_b0": lambda f, h, b, x: _gate(b, x) * f + (1 - _gate(b, x)) * h,
    "exclusive_gating_b7": lambda f, h, b, x: _gate(b, x) * f + (1 - _gate(b, x)) * h,
    "shortcut_gating": lambda f, h, b, x: f + (1 - _gate(b, x)) * h,
    "shortcut_gating_b0": lambda f, h, b, x: f + (1 - _gate(b, x)) * h,
    "conv": lambda f, h, b, x: f + b.downsample(x),
    "dropout": lambda f, h, b, x: f + 0.5 * h,  # eval: the expectation of the kept half
}
GATE_BIAS = {"exclusive_gating": -6.0, "exclusive_gating_b0": 0.0, "exclusive_gating_b7": -7.0,
             "shortcut_gating": -6.0, "shortcut_gating_b0": 0.0}


def test_variant_table_is_covered():
    assert set(VARIANT_SUMS) == set(SHORTCUT_VARIANTS)


@pytest.mark.parametrize("name", SHORTCUT_VARIANTS)
@pytest.mark.parametrize("inplanes,stride", [(8, 1), (4, 2)])
def test_shortcut_variant_forward(name, inplanes, stride):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, width=4, shortcut_variant=name)
    block = BasicBlock(inplanes, 8, stride, shortcut=SHORTCUT_VARIANTS[name].kind or "A",
                       shortcut_variant=name).eval()
    random_weights_(block)
    if name in GATE_BIAS:
        nn.init.constant_(block.gate.bias, GATE_BIAS[name] + 1.0)  # not what init set: fresh
    x = torch.randn(2, inplanes, 6, 6)
    with torch.no_grad():
        f = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        h = x if block.downsample is None else block.downsample(x)
        expected = torch.relu(VARIANT_SUMS[name](f, h, block, x))
        torch.testing.assert_close(block(x), expected, rtol=1e-6, atol=1e-6)
        # with F forced to zero the output is the (scaled, gated) shortcut alone
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
        block.bn2.running_mean.zero_()
        expected = torch.relu(VARIANT_SUMS[name](torch.zeros_like(f), h, block, x))
        torch.testing.assert_close(block(x), expected, rtol=1e-6, atol=1e-6)
    # in a built net every unit has the variant; gates start at the paper's b_g
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 9 and all(m.shortcut_variant is SHORTCUT_VARIANTS[name]
                                    for m in blocks)
    if name in GATE_BIAS:
        assert all(torch.all(m.gate.bias == GATE_BIAS[name]) for m in blocks)
    else:
        assert all(m.gate is None for m in blocks)
    if name == "conv":  # 1x1 conv shortcut everywhere = option C
        assert all(isinstance(m.downsample, nn.Sequential) for m in blocks)


def test_dropout_shortcut_in_training_keeps_half_unscaled():
    torch.manual_seed(0)
    block = BasicBlock(8, 8, unit="full_preact", shortcut_variant="dropout").train()
    x = torch.randn(4, 8, 16, 16)
    nn.init.zeros_(block.conv2.weight)  # F = 0: the output is the dropped shortcut
    out = block(x)
    kept = out == x
    assert torch.all(kept | (out == 0))
    assert 0.45 < kept.float().mean().item() < 0.55
    torch.testing.assert_close(block.eval()(x), 0.5 * x)


def test_plain_identity_by_default():
    torch.manual_seed(0)
    a = build_model("resnet20", 10, width=4)
    torch.manual_seed(0)
    b = build_model("resnet20", 10, width=4, shortcut_variant=None)
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any("gate" in k for k in a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ---------------------------------------------------------------- init


def test_init_statistics():
    torch.manual_seed(0)
    model = build_model("resnet18", 10)
    w = model.layer3[1].conv1.weight  # fan_out = 256 * 9
    assert abs(w.std().item() - (2 / (256 * 9)) ** 0.5) < 0.02 * (2 / (256 * 9)) ** 0.5
    assert torch.equal(model.layer3[1].bn2.weight, torch.ones(256))
    assert torch.equal(model.layer3[1].bn2.bias, torch.zeros(256))


def _pre(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """A block's shared pre-activation, recomputed independently (train-mode BN)."""
    for name in block.pre_ops:
        if name == "relu":
            x = torch.relu(x)
        else:
            bn = getattr(block, name)
            x = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True)
    return x


ZERO_INIT_UNITS = ["original", "relu_only_preact", "full_preact"]


@pytest.mark.parametrize("unit", ZERO_INIT_UNITS)
@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "resnet50", "resnet164"])
def test_zero_init_makes_identity_blocks(arch, unit):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=4, unit=unit, zero_init_residual=True)
    model.train()
    seen = []

    def check(block, inputs, output):
        (x,) = inputs
        if block.downsample is None:  # identity shortcut (after any shared pre-activation)
            expected = _pre(block, x)
            if unit == "original":  # ReLU follows the addition
                expected = torch.relu(expected)
            torch.testing.assert_close(output, expected, rtol=0, atol=0)
            seen.append(block)

    for m in model.modules():
        if isinstance(m, ResidualBlock):
            m.register_forward_hook(check)
    size = 64 if arch_family(arch) == "imagenet" else 32
    model(torch.randn(2, 3, size, size))
    assert len(seen) >= 5
    # a block on its own, on a random input with negative values
    block = model.layer1[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(x) if unit == "original" else x,
                               rtol=0, atol=0)
    # without zero init the same blocks change their input
    torch.manual_seed(0)
    plain_init = build_model(arch, 10, width=4, unit=unit)
    block = plain_init.layer1[1]
    assert not torch.allclose(block(x), torch.relu(x) if unit == "original" else x)


def test_zero_init_targets_the_layer_that_ends_f():
    for unit, name in [("original", "bn3"), ("relu_only_preact", "bn3"),
                       ("full_preact", "conv3")]:
        block = Bottleneck(16, 4, unit=unit)
        block.zero_init_last()
        assert torch.count_nonzero(getattr(block, name).weight) == 0, unit
    for unit in ("bn_after_add", "relu_before_add"):
        with pytest.raises(ValueError):
            Bottleneck(16, 4, unit=unit).zero_init_last()


@pytest.mark.parametrize("unit,needle", [("bn_after_add", "normalises"),
                                         ("relu_before_add", "never train")])
def test_zero_init_refused_where_no_trainable_identity(unit, needle):
    with pytest.raises(UserError, match=needle) as info:
        build_model("resnet20", 10, unit=unit, zero_init_residual=True)
    assert "\n" not in str(info.value) and unit in str(info.value)


def test_relu_before_add_with_zeroed_bn_is_dead():
    # why relu_before_add is refused: F = relu(bn(...)) with gamma 0 outputs exactly 0 and
    # passes no gradient to any weight of the branch
    torch.manual_seed(0)
    block = BasicBlock(4, 4, unit="relu_before_add")
    nn.init.zeros_(block.bn2.weight)
    x = torch.randn(2, 4, 6, 6)
    out = block(x)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in block.named_parameters():
        assert torch.count_nonzero(p.grad) == 0, name


# ---------------------------------------------------------------- layout, norms, errors


@pytest.mark.parametrize("arch,size", [("resnet20", 32), ("resnet50", 64),
                                       ("preact_resnet18", 64)])
def test_channels_last_end_to_end(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=8).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    layouts = []
    for m in model.modules():
        if isinstance(m, ResidualBlock):
            m.register_forward_hook(lambda m, i, o: layouts.append(
                o.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last))
    assert layouts and all(layouts)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_report_norms_match_independent_computation():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, width=4, report_norms=True).eval()
    inputs = {}
    block = model.layer2[1]
    block.register_forward_hook(lambda m, i, o: inputs.setdefault("x", i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        x = inputs["x"]
        fx_ = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    norms = collect_block_norms(model)
    assert len(norms) == 9 and "layer2.1" in norms
    assert norms["layer2.1"][0] == pytest.approx(fx_.norm().item(), rel=1e-5)
    assert norms["layer2.1"][1] == pytest.approx(x.norm().item(), rel=1e-5)
    assert all(isinstance(v, float) for pair in norms.values() for v in pair)

    set_report_norms(model, False)
    assert collect_block_norms(model) == {}
    model(torch.randn(1, 3, 32, 32))
    assert collect_block_norms(model) == {}
    set_report_norms(model, True)
    model(torch.randn(1, 3, 32, 32))
    assert len(collect_block_norms(model)) == 9


def test_report_norms_off_by_default():
    model = build_model("resnet20", 10, width=4)
    model(torch.randn(1, 3, 32, 32))
    assert collect_block_norms(model) == {}


@pytest.mark.parametrize("arch,options,needles", [
    ("resnt50", {}, ["resnt50", "'resnet50'", "resnet18", "preact_resnet1001"]),
    ("resnet20", {"unit": "fullpreact"}, ["unit", "original", "full_preact"]),
    ("resnet20", {"shortcut": "D"}, ["shortcut", "A, B, C, none"]),
    ("resnet20", {"variant": "v1.5"}, ["variant", "resnet20", "v1"]),
    ("resnet50", {"variant": "v2"}, ["variant", "v1.5, v1"]),
    ("resnet20", {"depth": 3}, ["depth", "variant", "report_norms"]),
    ("resnet20", {"width": 0}, ["width"]),
    ("resnet20", {"zero_init_residual": "yes"}, ["zero_init_residual"]),
    ("plain20", {"zero_init_residual": True}, ["zero_init_residual"]),
    ("plain20", {"shortcut": "A"}, ["plain20", "shortcut"]),
    ("preact_resnet110", {"unit": "original"}, ["full_preact"]),
    # arch names are exact, the hint ignores case
    ("RESNET50", {}, ["'RESNET50'", "did you mean 'resnet50'?"]),
    ("ResNet-110", {}, ["did you mean 'resnet110'?"]),
    # option A on bottleneck nets: the first unit widens 4x
    ("resnet50", {"shortcut": "A"}, ["shortcut='A'", "resnet50", "bottleneck", "1/4", "B"]),
    ("preact_resnet164", {"shortcut": "A"}, ["preact_resnet164", "bottleneck"]),
    ("resnet20", {"shortcut_variant": "gating"}, ["shortcut_variant", "exclusive_gating"]),
    ("plain20", {"shortcut_variant": "scale_both"}, ["shortcut_variant", "plain20"]),
    ("resnet110", {"shortcut_variant": "conv", "shortcut": "A"}, ["option C", "'A'"]),
    ("resnet20", {"shortcut_variant": "dropout", "zero_init_residual": True},
     ["zero_init_residual", "dropout"]),
])
def test_bad_arch_or_option_raises_user_error(arch, options, needles):
    with pytest.raises(UserError) as info:
        build_model(arch, 10, **options)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_bad_num_classes_and_unknown_family_lookup():
    with pytest.raises(UserError, match="num_classes"):
        build_model("resnet20", 0)
    with pytest.raises(UserError, match="resnet56"):
        arch_family("resnet65")
    # options that equal the pinned or only choice are accepted
    assert build_model("resnet20", 10, variant="v1", width=4) is not None
    assert build_model("plain20", 10, shortcut="none", width=4) is not None


# ---------------------------------------------------------------- IM Table 3: 1-layer units

ONE_LAYER = {"resnet110_1layer": "original", "preact_resnet110_1layer": "full_preact"}


def _blocks(model: nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.mark.parametrize("arch", ONE_LAYER)
def test_one_layer_nets_have_110_weight_layers_and_108_units(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, width=4)
    assert ARCH_SPECS[arch].unit == ONE_LAYER[arch]
    blocks = _blocks(model)
    assert len(blocks) == 108 and [len(model.layer1), len(model.layer2), len(model.layer3)] \
        == [36, 36, 36]
    for block in blocks:
        convs = [n for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        assert convs == ["conv1"] and block.conv1.kernel_size == (3, 3)
    # option A: the only shortcuts that do anything are the two parameter-free pads, in the
    # strided first units of stages 2 and 3, so every conv lies on the deepest path
    pads = [b for b in blocks if b.downsample is not None]
    assert pads == [model.layer2[0], model.layer3[0]]
    assert all(isinstance(b.downsample, PadShortcut) and b.conv1.stride == (2, 2) for b in pads)
    assert all(b.conv1.stride == (1, 1) for b in blocks if b not in pads)
    ops = op_kinds(model)
    assert ops.count("conv") + ops.count("fc") == 110  # stem + 108 units + fc
    assert (ops.count("add"), ops.count("pad")) == (108, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch,two_conv", [("resnet110_1layer", "resnet110"),
                                           ("preact_resnet110_1layer", "preact_resnet110")])
def test_one_layer_nets_have_resnet110s_parameters(arch, two_conv):
    # the same 108 unit convs (one 16->32 and one 32->64, the rest square) and BN widths,
    # grouped one per unit instead of two
    assert n_params(meta_model(arch, 10)) == n_params(meta_model(two_conv, 10)) \
        == CIFAR_COUNTS["resnet110"]


def test_one_layer_unit_op_orders():
    assert op_kinds(OneLayerBlock(8, 8)) == "conv bn add relu".split()
    assert op_kinds(OneLayerBlock(8, 8, unit="full_preact")) == "bn relu conv add".split()
    assert op_kinds(OneLayerBlock(4, 8, 2)) == "conv bn pad add relu".split()
    shared = OneLayerBlock(4, 8, 2, unit="full_preact", preact="shared")
    assert op_kinds(shared) == "bn relu conv pad add".split()
    assert shared.bn1.num_features == 4
    original = op_kinds(build_model("resnet110_1layer", 10, width=4))
    assert original[:5] == ["conv", "bn", "relu", "conv", "bn"]
    assert original[-4:] == ["add", "relu", "avgpool", "fc"]
    preact = op_kinds(build_model("preact_resnet110_1layer", 10, width=4))
    # bare conv stem; the first unit's BN-ReLU is the first BN-ReLU of the net
    assert preact[:4] == ["conv", "bn", "relu", "conv"]
    assert preact[-5:] == ["add", "bn", "relu", "avgpool", "fc"]


def _record_unit(block: ResidualBlock, seen: dict) -> None:
    """Hooks storing each op's input and output tensor of one 1-layer unit's forward."""
    def pre(name):
        return lambda m, inputs: seen.setdefault(block, {}).__setitem__(f"{name}_in", inputs[0])

    def post(name):
        return lambda m, inputs, out: seen[block].__setitem__(f"{name}_out", out)

    for name in ("block", "bn1", "relu", "conv1"):
        m = block if name == "block" else getattr(block, name)
        m.register_forward_pre_hook(pre(name))
        m.register_forward_hook(post(name))


def _shortcut(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    return x if block.downsample is None else block.downsample(x)


@pytest.mark.parametrize("arch", ONE_LAYER)
def test_one_layer_units_apply_their_order(arch):
    # every unit of the built net, followed tensor by tensor: which op reads the unit's input
    # and what is added to what
    torch.manual_seed(0)
    model = build_model(arch, 10, width=4).train()
    seen: dict = {}
    for block in _blocks(model):
        _record_unit(block, seen)
    model(torch.randn(2, 3, 32, 32))
    assert len(seen) == 108
    for block, t in seen.items():
        x = t["block_in"]
        if arch.startswith("preact"):  # BN, then ReLU, then the conv; no op after the add
            assert t["bn1_in"] is x and t["relu_in"] is t["bn1_out"]
            assert t["conv1_in"] is t["relu_out"]
            h = _shortcut(block, t["relu_out"] if block.pre_ops else x)
            torch.testing.assert_close(t["relu_out"], _pre(block, x) if block.pre_ops
                                       else torch.relu(block.bn1(x)), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(t["block_out"], t["conv1_out"] + h, rtol=0, atol=0)
        else:  # conv, BN, add, then the ReLU that ends the unit
            assert t["conv1_in"] is x and t["bn1_in"] is t["conv1_out"]
            torch.testing.assert_close(t["relu_in"], t["bn1_out"] + _shortcut(block, x),
                                       rtol=0, atol=0)
            assert t["block_out"] is t["relu_out"] and t["block_out"].min() >= 0
    # the shared pre-activation: every stage's first unit, the rest apply it in F
    shared = [b for b in seen if b.pre_ops]
    assert shared == ([model.layer1[0], model.layer2[0], model.layer3[0]]
                      if arch.startswith("preact") else [])


@pytest.mark.parametrize("unit", sorted(set(UNITS) - set(OneLayerBlock.units)))
def test_one_layer_nets_refuse_other_unit_orders(unit, capsys):
    assert OneLayerBlock.units == ("original", "full_preact")
    with pytest.raises(UserError) as info:
        build_model("resnet110_1layer", 10, unit=unit, width=4)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in (f"unit={unit!r}", "resnet110_1layer", "Table 3", "original, full_preact"):
        assert needle in msg
    with pytest.raises(UserError, match="fixes unit='full_preact'"):
        build_model("preact_resnet110_1layer", 10, unit=unit, width=4)
    with pytest.raises(ValueError, match=unit):
        OneLayerBlock(8, 8, unit=unit)
    # as the CLI reports it: one line on stderr, exit code 2
    assert run_main("resnet-train", lambda: build_model("resnet110_1layer", 10,
                                                        unit=unit)) == 2
    err = capsys.readouterr().err
    assert err == f"resnet-train: error: {msg}\n"
    # the two orders of Table 3 build, from either name
    assert build_model("resnet110_1layer", 10, unit="full_preact", width=4) is not None
    assert build_model("preact_resnet110_1layer", 10, unit="full_preact", width=4) is not None


def test_cifar_depths_outside_the_table_are_built_on_the_fly():
    from resnet_train.errors import UserError
    from resnet_train.models import arch_family
    for arch, units in (("plain8", 3), ("resnet14", 6), ("resnet26", 12)):
        m = build_model(arch, 10, width=2)
        blocks = [b for b in m.modules() if isinstance(b, BasicBlock)]
        assert len(blocks) == units and arch_family(arch) == "cifar"
        assert all(b.residual == arch.startswith("resnet") for b in blocks)
    assert arch_family("resnet50") == "imagenet"  # the table wins
    with pytest.raises(UserError, match="6n\\+2"):
        build_model("resnet9", 10)

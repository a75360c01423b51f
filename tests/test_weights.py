"""Weights in: state-dict files, wrappers, torchvision names (offline), akamaster's CIFAR nets."""

import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init
import torchvision
from torchvision.models import ResNet18_Weights

from resnet_train.errors import CheckpointError, UserError
from resnet_train.models import build_model
from resnet_train.weights import fit_weights, from_akamaster, load_weights

# --- akamaster/pytorch_resnet_cifar10's resnet.py, re-implemented from their code -----------
# (their module and attribute names, option A shortcut, _weights_init, `linear` head), so the
# importer is checked against their network, not against ours.


def _weights_init(m):
    if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d):
        init.kaiming_normal_(m.weight)


class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class AkaBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # option A, their default
            self.shortcut = LambdaLayer(lambda x: F.pad(
                x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class AkaResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.linear = nn.Linear(64, num_classes)
        self.apply(_weights_init)

    def _make_layer(self, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for s in strides:
            layers.append(AkaBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def _randomised_akamaster(n: int, seed: int) -> AkaResNet:
    """Their resnet{6n+2} with random BN affine parameters and per-channel running statistics
    (measured on random images, as training would leave them, so the logits stay of order 1)
    and a random fc bias: at BN's 1/0 init a wrong channel order could hide."""
    torch.manual_seed(seed)
    net = AkaResNet([n, n, n])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
            m.momentum = None  # a cumulative average over the batches below
    net.linear.bias.data.normal_()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, 32, 32))
    return net.eval()


def _save_like_akamaster(net: nn.Module, path) -> None:
    # their trainer.py: model = DataParallel(...); torch.save({'state_dict':
    # model.state_dict(), 'best_prec1': ...}); DataParallel's keys carry 'module.'
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "best_prec1": 91.2}, path)


@pytest.mark.parametrize("n", [3, 9])  # resnet20, resnet56
def test_akamaster_import_reproduces_their_outputs(tmp_path, n):
    theirs = _randomised_akamaster(n, seed=n)
    path = tmp_path / "aka.th"
    _save_like_akamaster(theirs, path)
    ours = build_model(f"resnet{6 * n + 2}", 10).eval()
    state = load_weights(str(path), source="akamaster")
    assert set(state) == set(ours.state_dict())
    assert fit_weights(ours, state, str(path), new_head_ok=False) == []
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert expected.abs().max() > 0.5  # the comparison below is not of near-zero logits
    assert (got - expected).abs().max() <= 1e-5


def test_akamaster_rename_alone_does_not_match(tmp_path):
    theirs = _randomised_akamaster(3, seed=1)
    renamed = {("fc" + k[len("linear"):] if k.startswith("linear") else k): v
               for k, v in theirs.state_dict().items()}
    ours = build_model("resnet20", 10).eval()
    fit_weights(ours, renamed, "renamed")  # loads: the keys and shapes are the same
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() > 0.1  # the channel order is what differs
        ours.load_state_dict(from_akamaster(theirs.state_dict()))
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_akamaster_source_refuses_our_format(tmp_path):
    path = tmp_path / "ours.pt"
    torch.save({"model": build_model("resnet20", 10, width=4).state_dict()}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: not an akamaster.*'linear.weight'"):
        load_weights(str(path), source="akamaster")
    with pytest.raises(UserError, match="unknown weights source 'caffe'.*native, akamaster"):
        load_weights(str(path), source="caffe")
    state = {"module." + k: v for k, v in AkaResNet([1, 1, 1]).state_dict().items()}
    state["module.layer2.0.shortcut.0.weight"] = torch.zeros(32, 16, 1, 1)
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=f"^{path}: 'layer2.0.shortcut.0.weight' is an "
                       "option B shortcut"):
        load_weights(str(path), source="akamaster")


# --- files and wrappers -----------------------------------------------------------------------


def _tiny(num_classes=10, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes, width=4)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,  # a plain state dict
    lambda sd: {"model": sd, "format": 2, "global_step": 7, "optimizer": {"state": {}}},  # ours
    lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},  # DDP
    lambda sd: {"model_state": {"_orig_mod." + k: v for k, v in sd.items()}},  # compiled
    lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},  # DDP of compiled
], ids=["plain", "ours", "state_dict+module", "model_state+orig_mod", "both_prefixes"])
def test_file_formats_round_trip(tmp_path, wrap):
    model = _tiny()
    path = tmp_path / "w.pt"
    torch.save(wrap(model.state_dict()), path)
    state = load_weights(str(path))
    _assert_same(state, model.state_dict())
    fresh = _tiny(seed=1)
    assert fit_weights(fresh, state, str(path)) == []
    _assert_same(fresh.state_dict(), model.state_dict())


def test_prefix_on_some_keys_only_is_kept(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, path)
    assert set(load_weights(str(path))) == {"module.a", "b"}


def test_new_head_keeps_the_fresh_one(tmp_path):
    source = _tiny(10, seed=0)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    target = _tiny(7, seed=1)
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("fc.")}
    notices = fit_weights(target, load_weights(str(path)), str(path))
    assert notices == [f"{path}: fc 10 -> 7 classes: the head is newly initialised"]
    for k, v in target.state_dict().items():
        if k.startswith("fc."):
            assert torch.equal(v, fresh_head[k]), k
        else:
            assert torch.equal(v, source.state_dict()[k]), k


def test_new_head_refused_when_not_allowed(tmp_path):
    state = _tiny(10).state_dict()
    target = _tiny(7, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="^w.pt: its head fc has 10 classes, the model 7"):
        fit_weights(target, state, "w.pt", new_head_ok=False)
    _assert_same(target.state_dict(), before)  # nothing was loaded


def test_mismatches_name_the_keys():
    model = _tiny()
    state = dict(model.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(8, 5, 3, 3)  # the model's: (8, 4, 3, 3)
    with pytest.raises(CheckpointError, match=r"^w.pt: .*shape mismatch: layer2.0.conv1.weight"):
        fit_weights(_tiny(), state, "w.pt")
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError,
                       match=r"missing: layer2.0.conv1.weight; unexpected: extra.weight"):
        fit_weights(_tiny(), state, "w.pt")


def test_missing_bn_counters_are_filled():
    # torch < 0.4.1 files (akamaster's released ones) have no num_batches_tracked
    model = _tiny()
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    target = _tiny(seed=1)
    assert fit_weights(target, state, "old.pt") == []
    assert torch.equal(target.layer1[0].bn1.running_var, model.layer1[0].bn1.running_var)


class Pickled:
    """A class instance: torch.save pickles a reference to this code."""

    def __init__(self):
        self.weight = torch.ones(2)


@pytest.mark.parametrize("write, message", [
    (None, "weights file not found: {p}$"),
    (lambda p: p.mkdir(), "^{p}: a directory, not a weights file$"),
    (lambda p: p.write_bytes(b"\x00garbage" * 64), "^{p}: not a PyTorch weights file"),
    (lambda p: p.write_bytes(_saved_bytes(p, {"a": torch.ones(3)})[:120]),
     "^{p}: not a readable weights file"),
    (lambda p: torch.save(Pickled(), p), r"^{p}: holds pickled code \(.*Pickled\)"),
    (lambda p: torch.save([torch.ones(1)], p), r"^{p}: not a state dict \(it holds a list\)"),
    (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p),
     "^{p}: not a state dict: entry 'epoch' is a int"),
], ids=["missing", "directory", "garbage", "truncated", "code", "list", "non_tensors"])
def test_bad_files_name_the_path(tmp_path, write, message):
    path = tmp_path / "w.pt"
    if write is not None:
        write(path)
    with pytest.raises(UserError, match=message.format(p=path)) as e:
        load_weights(str(path))
    assert "\n" not in str(e.value)


def _saved_bytes(path, obj) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


# --- torchvision names, offline ----------------------------------------------------------------


def test_torchvision_names_are_checked():
    with pytest.raises(UserError, match="torchvision:NOPE: not a torchvision weights name for "
                       "resnet50; valid: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        load_weights("torchvision:NOPE", "resnet50")
    with pytest.raises(UserError, match="ResNet18_Weights.IMAGENET1K_V1: not a torchvision "
                       "weights name for resnet50"):
        load_weights("torchvision:ResNet18_Weights.IMAGENET1K_V1", "resnet50")
    with pytest.raises(UserError, match="torchvision has no weights for arch 'resnet20'; it "
                       "has: resnet18, resnet34"):
        load_weights("torchvision:IMAGENET1K_V1", "resnet20")
    with pytest.raises(UserError, match="the arch is needed"):
        load_weights("torchvision:IMAGENET1K_V1")
    with pytest.raises(UserError, match="source 'akamaster' converts files only"):
        load_weights("torchvision:IMAGENET1K_V1", "resnet18", source="akamaster")


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_load_into_ours(monkeypatch, name):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    calls = []

    def fake_download(self, *args, **kwargs):  # what torch.hub would return
        calls.append((self, kwargs))
        return {k: v.clone() for k, v in reference.state_dict().items()}

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", fake_download)
    state = load_weights(f"torchvision:{name}", "resnet18")
    assert calls == [(ResNet18_Weights.IMAGENET1K_V1,
                      {"progress": False, "map_location": "cpu", "weights_only": True})]
    ours = build_model("resnet18", 1000, variant="v1", shortcut="B").eval()
    assert fit_weights(ours, state, name, new_head_ok=False) == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() <= 1e-5


def test_torchvision_download_failure_says_offline(monkeypatch):
    def no_network(self, *args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", no_network)
    with pytest.raises(CheckpointError) as e:
        load_weights("torchvision:IMAGENET1K_V1", "resnet18")
    message = str(e.value)
    assert message.startswith("torchvision:IMAGENET1K_V1: could not get https://")
    assert "name resolution" in message and "may be offline" in message
    assert "pass its path" in message and "\n" not in message


def test_torchvision_resnet50_is_our_v1_5():
    # torchvision's Bottleneck strides in the 3x3 conv: its ImageNet weights are our v1.5
    # (the default); loaded into v1 (stride in the first 1x1) the keys fit but outputs differ.
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        for variant, close in (("v1.5", True), ("v1", False)):
            ours = build_model("resnet50", 1000, variant=variant).eval()
            fit_weights(ours, reference.state_dict(), "torchvision", new_head_ok=False)
            assert ((ours(x) - expected).abs().max() <= 1e-5) == close, variant

"""``resnet-analyze``: DRL Fig. 7, the standard deviation of each 3x3 layer's responses, and
each residual block's ||F(x)|| / ||x||, over validation images of a checkpoint.

A response is the output of a 3x3 conv after its BN, before the addition and the ReLU (DRL
Sec. 4.2: "the outputs of each 3x3 layer, after BN and before other nonlinearity (ReLU/
addition)"), the output of the BN right after the conv wherever there is one (a
pre-activation unit's bn2 after its conv1); where none follows the conv within the unit (a
pre-activation unit's last conv, a one-layer pre-activation unit, BN after the addition) it
is the conv's output. Its std is computed per channel over images and
positions and averaged over channels (``std``; ``std_all`` is the std of all values at
once), with the model in eval mode, as the trained net responds at test time.
"""

from __future__ import annotations


import torch
import torch.nn as nn

from ..errors import UserError
from ..models.blocks import ResidualBlock


def response_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) whose outputs are the responses, in network order."""
    out = []
    stem_conv, stem_bn = getattr(model, "conv1", None), getattr(model, "bn1", None)
    if isinstance(stem_conv, nn.Conv2d) and stem_conv.kernel_size == (3, 3):
        out.append(("conv1", stem_bn if isinstance(stem_bn, nn.BatchNorm2d) else stem_conv))
    for name, block in model.named_modules():
        if not isinstance(block, ResidualBlock):
            continue
        ops = list(block.branch_ops)
        for i, op in enumerate(ops):
            conv = getattr(block, op) if op.startswith("conv") else None
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
                continue
            # the BN right after the conv, whatever its index (pre-activation: conv1, bn2)
            after = ops[i + 1] if i + 1 < len(ops) and ops[i + 1].startswith("bn") else op
            out.append((f"{name}.{after}", getattr(block, after)))
    return out


class _Moments:
    """Per-channel sums of x and x^2 (float64) of a module's outputs."""

    def __init__(self):
        self.s = self.s2 = None
        self.n = 0

    def __call__(self, module, inputs, output) -> None:
        x = output.detach().double().transpose(0, 1).reshape(output.shape[1], -1)
        s, s2 = x.sum(1), (x * x).sum(1)
        self.s, self.s2 = (s, s2) if self.s is None else (self.s + s, self.s2 + s2)
        self.n += x.shape[1]

    def std(self) -> tuple[float, float]:
        mean = self.s / self.n
        per_channel = (self.s2 / self.n - mean ** 2).clamp(min=0).sqrt()
        total = float(self.s.sum() / (self.n * len(self.s)))
        var_all = float(self.s2.sum() / (self.n * len(self.s))) - total ** 2
        return float(per_channel.mean()), max(var_all, 0.0) ** 0.5


@torch.no_grad()
def analyze(model: nn.Module, batches, images: int) -> dict:
    """Responses' std per layer and ||F(x)|| / ||x|| per block over ``images`` images of
    ``batches`` (prepared input tensors)."""
    from ..models import collect_block_norms, set_report_norms
    layers = response_layers(model)
    if not layers:
        raise UserError("the model has no 3x3 conv layers to analyze")
    moments = [_Moments() for _ in layers]
    hooks = [m.register_forward_hook(h) for (_, m), h in zip(layers, moments, strict=True)]
    norms: dict[str, list[float]] = {}
    seen = 0
    model.eval()
    set_report_norms(model, True)
    try:
        for x in batches:
            x = x[: images - seen]
            model(x)
            for name, (fx, xn) in collect_block_norms(model).items():
                acc = norms.setdefault(name, [0.0, 0.0])
                acc[0] += fx * fx
                acc[1] += xn * xn
            seen += x.shape[0]
            if seen >= images:
                break
    finally:
        for h in hooks:
            h.remove()
        set_report_norms(model, False)
    stds = [m.std() for m in moments]
    return {"images": seen,
            "layers": [{"name": n, "std": s, "std_all": a}
                       for (n, _), (s, a) in zip(layers, stds, strict=True)],
            "blocks": [{"name": n, "f_over_x": (f ** 0.5) / max(x ** 0.5, 1e-12)}
                       for n, (f, x) in norms.items()]}


def draw(path: str, results: dict[str, dict]) -> None:
    """DRL Fig. 7: response std by layer index (top) and sorted by magnitude (bottom), one
    line per checkpoint."""
    from .plot import new_figure, save_figure
    fig = new_figure((8, 6))
    top, bottom = fig.subplots(2, 1)
    for label, r in results.items():
        stds = [layer["std"] for layer in r["layers"]]
        top.plot(range(1, len(stds) + 1), stds, lw=1.2, label=label)
        bottom.plot(range(1, len(stds) + 1), sorted(stds, reverse=True), lw=1.2, label=label)
    top.set_xlabel("layer index (original)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)

"""Where and how the model runs (device, precision, layout), and the one model build path.

Training (``trainer.py``) and ``resnet-eval`` both call :func:`resolve_runtime` and
:func:`build_model_for`, so a checkpoint is always evaluated the way it was trained unless
the config says otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import Config
from .errors import ConfigError

AMP_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Runtime:
    """The resolved ``run.device``, ``train.amp`` and ``train.channels_last``."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the model's memory format (a no-op when it already is). Folder batches
        arrive NHWC in memory: left so, cuDNN would run an NCHW model in NHWC."""
        return x.contiguous(memory_format=torch.channels_last if self.channels_last
                            else torch.contiguous_format)

    def synchronize(self) -> None:
        """Wait for the work queued on the device (nothing to wait for on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        """Start a new window for ``peak_memory_gb`` (CUDA; nothing to do on the CPU). Before
        CUDA is initialised nothing was allocated, and the allocator refuses the call."""
        if self.device.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float | None:
        """The most device memory allocated since the last reset, in GiB; starts the next
        window. None on the CPU (no allocator statistics)."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reset_peak_memory()
        return peak

    def describe(self) -> str:
        return f"{self.device}, {AMP_NAMES[self.amp_dtype]}, channels_last={self.channels_last}"


def device_kind(kind: str) -> str:
    """'cpu' or 'cuda' for ``run.device`` (auto = cuda when available)."""
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return kind


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: cuda requested but no CUDA device is available")
    kind = device_kind(kind)
    return torch.device(f"cuda:{local_rank}") if kind == "cuda" else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 units (compute capability 8.0, Ampere, or newer). Not is_bf16_supported(): it
    also says yes where bf16 is only emulated (V100, T4), and its including_emulation
    switch is newer than the torch this project supports."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_has_native_bf16(device) else None
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp: fp16 needs a CUDA device (use bf16 on CPU)")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def resolve_channels_last(mode: str, device: torch.device, amp: torch.dtype | None) -> bool:
    if mode == "auto":
        # CPU (oneDNN): NHWC measured faster in every precision (scripts/bench_train.py:
        # ResNet-20 fp32 x1.30, bf16 x1.18; ResNet-50 fp32 x1.07, bf16 x1.15). CUDA: NHWC is
        # what tensor cores want for bf16/fp16; fp32 stays in cuDNN's native NCHW.
        return device.type == "cpu" or amp is not None
    return mode == "true"


def resolve_runtime(cfg: Config, local_rank: int = 0) -> Runtime:
    device = resolve_device(cfg.run.device, local_rank)
    amp = resolve_amp(cfg.train.amp, device)
    return Runtime(device, amp, resolve_channels_last(cfg.train.channels_last, device, amp))


def build_model_for(cfg: Config, num_classes: int, runtime: Runtime) -> nn.Module:
    """``cfg.model`` with ``num_classes`` outputs, on the runtime's device and layout."""
    from . import models  # looked up at call time: tests wrap models.build_model
    m = cfg.model
    model = models.build_model(m.arch, num_classes, variant=m.variant, shortcut=m.shortcut,
                               unit=m.unit, zero_init_residual=m.zero_init_residual,
                               width=m.width, shortcut_variant=m.shortcut_variant)
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; a container's cgroup limit is
    not visible here)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(cfg: Config, device: torch.device) -> int:
    """Set and return the main process's intra-op thread count (``run.threads``).

    On CPU, loader workers decode JPEGs on the same cores as the training step, and OpenMP
    threads that finish a kernel spin-wait for the next one: with every core taken by a
    spinning thread, the workers starve (measured by scripts/bench.py; see the README's
    Performance section). So with folder data on CPU the step gets the cores the workers do
    not use. An explicit OMP_NUM_THREADS (torchrun sets 1 per process) is respected.
    """
    threads = cfg.run.threads
    if threads is None and "OMP_NUM_THREADS" not in os.environ and device.type == "cpu" \
            and cfg.data.dataset in ("folder", "imagenet") and cfg.data.workers > 0:
        threads = max(1, usable_cores() - cfg.data.workers)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BYTES = 1 << 30  # blocks below this come from the heap, and it keeps this much free on top


def configure_host_memory(cfg: Config, device: torch.device) -> bool:
    """On CPU, keep freed tensor memory in the process (``run.keep_host_memory``); whether
    it is kept.

    torch's CPU tensors come from plain malloc. glibc serves large blocks by mmap and
    unmaps them on free (its threshold adapts, up to 32 MiB), and trims free memory off
    the heap top; every step frees and reallocates its activations, so the next step
    faults the same pages in again, zero-filled by the kernel: about 11,000 page faults
    (43 MiB) per ResNet-20 step at batch 128, with 0 once kept (scripts/bench.py epoch; the
    README's Performance section). CUDA's caching allocator keeps memory for the same
    reason, and PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for it. Set before
    the loaders start, so forked workers keep theirs too. Process-wide and not undone; the
    resident size stays at its peak. Not glibc (macOS, musl): nothing changes.
    """
    if not cfg.run.keep_host_memory or device.type != "cpu":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))

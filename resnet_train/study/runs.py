"""Reading run directories: the resolved config and the metrics.jsonl records of each run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import iter_keys, read_yaml
from ..errors import UserError

# Keys whose value defines what a run measures (the schema's resume classes that refuse a
# change: the model, data, recipe, length, validation); run.seed only repeats the experiment.
_EXPERIMENT_CLASSES = ("state", "length", "eval")
REPEAT_KEYS = ("run.seed",)


@dataclass
class Run:
    """One run directory: its resolved config (nested dict) and its metric records."""

    path: str
    config: dict
    epochs: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        """The config value of a dotted key (``model.arch``), or ``default``."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def final(self) -> dict | None:
        """The last epoch record."""
        return self.epochs[-1] if self.epochs else None

    @property
    def iterations(self) -> int:
        """Optimizer steps done: the largest global_step recorded."""
        return max((r.get("global_step") or 0 for r in self.epochs + self.steps), default=0)

    @property
    def steps_per_epoch(self) -> float | None:
        """Iterations per epoch, from an epoch record (None without one)."""
        for r in self.epochs:
            if r.get("global_step") and isinstance(r.get("epoch"), int):
                return r["global_step"] / (r["epoch"] + 1)
        return None


def experiment_keys() -> list[str]:
    """Schema keys that define an experiment (model, data, recipe, length), seed excluded."""
    return [k for k, _, f in iter_keys()
            if f.metadata["resume"] in _EXPERIMENT_CLASSES and k not in REPEAT_KEYS]


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """Epoch and step records of a metrics.jsonl, sorted; torn or foreign lines are skipped.

    A record repeated for the same epoch / global step (a run restarted by hand) keeps the
    last one written.
    """
    epochs: dict[int, dict] = {}
    steps: dict[int, dict] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read metrics: {e.strerror or e}") from None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash, or blank
        if not isinstance(rec, dict):
            continue
        if rec.get("kind") == "epoch" and isinstance(rec.get("epoch"), int):
            epochs[rec["epoch"]] = rec
        elif rec.get("kind") == "step" and isinstance(rec.get("global_step"), int):
            steps[rec["global_step"]] = rec
    return [epochs[k] for k in sorted(epochs)], [steps[k] for k in sorted(steps)]


def load_run(path: str) -> Run:
    """Load one run directory; a missing directory, metrics file or bad config is a UserError."""
    if not os.path.isdir(path):
        raise UserError(f"run directory not found: {path}")
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise UserError(f"{path}: no metrics.jsonl (not a run directory, or nothing logged yet)")
    cfg_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{path}: no config.yaml (not a run directory)")
    config = read_yaml(cfg_path)  # ConfigError (a UserError) names the file
    epochs, steps = read_metrics(metrics)
    return Run(path=path, config=config, epochs=epochs, steps=steps)


def load_runs(paths: list[str]) -> list[Run]:
    """Load several run directories, in the order given."""
    if not paths:
        raise UserError("no run directories given")
    return [load_run(p) for p in paths]


def differing(runs: list[Run], keys: list[str]) -> list[str]:
    """Those of ``keys`` whose value is not the same in every run."""
    return [k for k in keys if len({json.dumps(r.get(k), sort_keys=True) for r in runs}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """A short name per dotted key: its last part, unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (n if last.count(n) == 1 else k) for k, n in zip(keys, last, strict=True)}


def describe(run: Run, keys: list[str], names: dict[str, str] | None = None) -> str:
    """``resnet110 unit=full_preact``: the arch plus the given keys' values."""
    names = names or short_names(keys)
    parts = [str(run.get("model.arch", "?"))]
    parts += [f"{names[k]}={value_text(run.get(k))}" for k in keys if k != "model.arch"]
    return " ".join(parts)


def run_labels(runs: list[Run]) -> list[str]:
    """One distinct label per run: its run.name when that tells the runs apart, else a
    description (arch + the settings that differ, seed included), else the directory."""
    names = [str(r.get("run.name", "")) for r in runs]
    if len(set(names)) == len(names) and "run" not in names and "" not in names:
        return names
    keys = differing(runs, experiment_keys() + list(REPEAT_KEYS))
    labels = [describe(r, keys) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({os.path.basename(os.path.normpath(r.path))})"
                  for lab, r in zip(labels, runs, strict=True)]
    return labels


def value_text(v: Any) -> str:
    """A config value as it reads in a label: null, true, [1,2]."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(value_text(x) for x in v) + "]"
    return str(v)

"""On a machine with a GPU, the test files whose code paths change on CUDA run first.

The first look at a GPU machine (the workplace's gpu_check.sh) runs this whole suite
serially under a time limit and stops at the first failure: alphabetical order would spend
that time on CPU-only files (the benchmark fixture, 2-process DDP on gloo) before the CUDA
paths. Without a GPU the order is pytest's own.
"""

import torch

# Files by how much of them runs differently on CUDA (run.device=auto picks it there).
GPU_FIRST = ("test_engine.py", "test_training.py", "test_data.py", "test_optim.py",
             "test_device_decode.py", "test_features.py", "test_train_e2e.py",
             "test_checkpoint.py", "test_resume.py", "test_folder_train.py", "test_eval.py",
             "test_finetune.py", "test_analyze.py", "test_study.py", "test_export.py")


def gpu_first(items: list) -> list:
    """``items`` with GPU_FIRST's files first, in that order; the rest after, as they were."""
    rank = {name: i for i, name in enumerate(GPU_FIRST)}
    return sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        items[:] = gpu_first(items)

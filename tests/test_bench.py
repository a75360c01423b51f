"""scripts/bench.py (every subcommand in a tiny setting) and scripts/gpu_check.sh (syntax,
dry run). Figures are never compared with targets here: only that they are well formed."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from .helpers import ROOT

BENCH = os.path.join(ROOT, "scripts", "bench.py")
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")
THREAD_KEYS = {"torch_num_threads", "torch_num_interop_threads", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "cpu_count", "affinity_cpus",
               "load_average"}

# The tiny settings: a few images, steps and rounds each.
RUNS = {
    "data": ["--images", "24", "--batch", "8", "--workers", "1", "--epochs", "1",
             "--cifar-images", "256", "--cifar-batch", "64", "--cifar-workers", "1",
             "--cifar-epochs", "1", "--rounds", "1", "--min-seconds", "0"],
    "step": ["--width", "4", "--image-size", "16", "--batch", "16", "--warmup", "2",
             "--steps", "3", "--rounds", "2"],
    "epoch": ["--samples", "256", "--val-samples", "32", "--batch", "64", "--rounds", "1"],
    "scaling": ["--nproc", "2", "--width", "4", "--image-size", "16", "--batch", "16",
                "--steps", "3", "--epochs", "1", "--rounds", "1", "--timeout", "120"],
    "threads": ["--workers", "1", "--images", "16", "--width", "4", "--crop", "32",
                "--batch", "8", "--epochs", "1", "--rounds", "1", "--timeout", "120"],
}


# other tests that read a run's document
USES = {("step", "test_summarize_collects_each_parts_figures")}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_runs(request, tmp_path_factory):
    """Runs every selected subcommand once, in two lanes: scaling (torchrun, the longest)
    beside the others in turn; hands out (returncode, output, JSON document) by name.
    OMP_NUM_THREADS=1: the two lanes share the cores without spinning threads."""
    mine = [item.name for item in request.session.items if item.module is request.module]
    wanted = sorted({name for name in RUNS for test in mine
                     if test.startswith(f"test_{name}_") or (name, test) in USES},
                    key=lambda name: name != "scaling")
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def start(name):
        return subprocess.Popen([sys.executable, BENCH, name, *RUNS[name], "--device", "cpu",
                                 "--json", str(out / f"{name}.json")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)

    def result(name, proc):
        text, _ = proc.communicate(timeout=240)
        path = out / f"{name}.json"
        return proc.returncode, text, json.loads(path.read_text()) if path.exists() else None

    side = {name: start(name) for name in wanted if name in ("scaling", "threads")}
    results = {name: result(name, start(name)) for name in wanted if name not in side}
    results.update((name, result(name, proc)) for name, proc in side.items())
    return results


def check_common(result, command: str, rows: list[str], rounds: int) -> dict:
    """Exit 0, the thread settings printed and saved, each row's figures positive with
    min <= median <= max over `rounds` rounds."""
    code, text, doc = result
    assert code == 0, text
    assert text.startswith("threads: torch ") and "OMP_WAIT_POLICY=" in text, text[:300]
    assert doc["bench"] == command and doc["schema"] == 1 and doc["device"] == "cpu"
    assert set(doc["threads"]) == THREAD_KEYS and doc["threads"]["OMP_NUM_THREADS"] == "1"
    assert doc["threads"]["torch_num_threads"] >= 1 and doc["threads"]["cpu_count"] >= 1
    assert [r["name"] for r in doc["rows"]] == rows
    for r in doc["rows"]:
        for key in ("ours", "reference", "ratio"):
            s = r[key]
            assert len(s["values"]) == rounds, (r["name"], key)
            assert all(v > 0 for v in s["values"]), (r["name"], key)
            assert s["min"] <= s["median"] <= s["max"], (r["name"], key)
        assert r["ratio"]["values"] == pytest.approx(
            [o / b for o, b in zip(r["ours"]["values"], r["reference"]["values"], strict=True)])
        assert r["spread"] == pytest.approx(r["ratio"]["max"] / r["ratio"]["min"] - 1)
        assert r["name"] in text  # the table
    return doc


def test_data_times_each_pipeline_alone_in_its_own_process(bench_runs):
    doc = check_common(bench_runs["data"], "data",
                       ["folder wall", "folder per core", "cifar wall", "cifar per core"], 1)
    rows = {r["name"]: r for r in doc["rows"]}
    # every round ran in a fresh process of its own, never in the parent
    pids = [p for name in ("folder wall", "cifar wall")
            for side in ("ours", "reference") for p in rows[name]["pids"][side]]
    assert len(set(pids)) == len(pids) == 4 and doc["pid"] not in pids
    # and stopped its DataLoader workers (joined, not left idle) before it ended
    assert rows["folder wall"]["workers_stopped"] and rows["cifar wall"]["workers_stopped"]
    assert rows["folder wall"]["workers"] == {"ours": 1, "reference": 1}
    assert rows["cifar wall"]["workers"] == {"ours": 0, "reference": 1}
    # per core: images over the CPU seconds of the main process and its workers
    cpu = rows["folder per core"]["cpu_ms_per_image"]
    assert cpu["reference"]["workers"] > 0 and cpu["ours"]["workers"] > 0
    assert rows["folder wall"]["images_per_round"] == {"ours": 24, "reference": 24}
    assert rows["cifar wall"]["images_per_round"] == {"ours": 256, "reference": 256}


def test_step_compares_our_step_with_the_bare_loop(bench_runs):
    doc = check_common(bench_runs["step"], "step", ["train step"], 2)
    row = doc["rows"][0]
    assert row["labels"] == ["ours", "bare loop"] and row["target_ratio"] == 0.97
    assert row["overhead_pct"] == pytest.approx(100 * (1 / row["ratio"]["median"] - 1))
    # the design's promise, counted by the benchmark too: no host read in the step
    assert row["host_reads_per_step"] == {"ours": 0, "bare": 0}
    assert row["cuda_syncs_per_step"] == {"ours": None, "bare": None}
    assert row["runtime"].startswith("cpu, ") and set(row["warmup_s"]) == {"ours", "bare"}
    assert "our step's overhead" in bench_runs["step"][1]


def test_epoch_runs_the_cli_against_the_reference_script(bench_runs):
    doc = check_common(bench_runs["epoch"], "epoch", ["cifar epoch"], 1)
    row = doc["rows"][0]
    (ours,), (ref,) = row["ours_rounds"], row["reference_rounds"]
    assert ours["images"] == ref["images"] == 256  # 4 full batches of 64, both
    assert ours["cli_wall_s"] > ours["seconds"] > 0
    assert "data.dataset=cifar10" in ours["command"] and ref["pid"] != doc["pid"]


def test_scaling_runs_torchrun_with_1_and_2_processes(bench_runs):
    doc = check_common(bench_runs["scaling"], "scaling", ["2 vs 1 processes"], 1)
    row = doc["rows"][0]
    assert row["nproc"] == 2 and row["backend"] == "gloo" and row["threads_per_proc"] >= 1
    assert row["labels"] == ["2 processes", "1 process"]
    assert row["efficiency"]["median"] == pytest.approx(row["ratio"]["median"] / 2)


def test_threads_runs_the_cli_with_the_default_and_every_core(bench_runs):
    doc = check_common(bench_runs["threads"], "threads", ["workers=1"], 1)
    row, cores = doc["rows"][0], doc["threads"]["affinity_cpus"] or doc["threads"]["cpu_count"]
    assert row["workers"] == 1 and row["labels"] == ["default threads", f"{cores} threads"]
    # the CLI's own banner: the default leaves the one worker its core; the reference all
    assert row["main_threads"] == {"ours": [max(1, cores - 1)], "reference": [cores]}
    assert all(0 <= f <= 1 for f in row["data_wait_frac"]["ours"])


def test_stat_and_rows_pair_the_alternating_rounds():
    bench = load_bench()
    assert bench.stat([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0,
                                            "values": [3.0, 1.0, 2.0]}
    row = bench.compare_row("x", "images/s", [10.0, 30.0], [5.0, 10.0], target=2.5)
    assert row["ratio"]["values"] == [2.0, 3.0] and row["ratio"]["median"] == 2.5
    assert row["meets_target"] is True and row["spread"] == pytest.approx(0.5)
    order = []
    a, b = bench.alternate(2, lambda i: order.append(("ours", i)) or i,
                           lambda i: order.append(("ref", i)) or -i)
    assert order == [("ours", 0), ("ref", 0), ("ours", 1), ("ref", 1)] and b == [0, -1]


def test_sync_counter_counts_host_reads_and_puts_the_methods_back():
    """The negative control of the step's "host reads per step": reads are seen."""
    import torch
    bench = load_bench()
    real = torch.Tensor.item
    t = torch.ones(2)
    with bench.SyncCounter(torch.device("cpu")) as c:
        t.sum().item()
        bool(t[0])
        t.tolist()
        t.add_(1)  # device work is not a read
    assert c.reads == 3 and c.cuda_syncs == 0
    assert torch.Tensor.item is real


def test_compare_says_whether_repeated_runs_agree(tmp_path, capsys):
    bench = load_bench()
    paths = []
    for i, ratio in enumerate([2.0, 2.2, 2.6]):
        p = tmp_path / f"run{i}.json"
        p.write_text(json.dumps({"rows": [{"name": "folder per core",
                                           "ratio": {"median": ratio}}]}))
        paths.append(str(p))
    assert bench.main(["compare", *paths[:2]]) == 0  # 10% apart
    assert "agree within 20%: yes" in capsys.readouterr().out
    assert bench.main(["compare", *paths]) == 1  # 30% apart
    assert "agree within 20%: NO" in capsys.readouterr().out


def test_gpu_check_is_valid_bash():
    assert subprocess.run(["bash", "-n", GPU_CHECK]).returncode == 0


def test_gpu_check_dry_run_lists_every_part_with_valid_bench_flags(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_DRY": "1", "PY": sys.executable}
    proc = subprocess.run(["bash", GPU_CHECK], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [p["part"] for p in summary["parts"]]
    assert names == ["env", "tests", "r50_eager", "r20_step", "folder_loader", "cifar_epoch",
                     "r50_compiled", "folder_nvjpeg"]
    assert summary["dry_run"] is True and {p["status"] for p in summary["parts"]} == {"dry"}
    assert all(p["timeout_s"] <= 430 for p in summary["parts"])  # clipped to the budget
    bench = load_bench()
    commands = [shlex.split(line) for line in
                (tmp_path / "commands.txt").read_text().splitlines()]
    assert len(commands) == len(names)
    parsed = {}
    for cmd, name in zip(commands, names, strict=True):
        if "scripts/bench.py" in cmd:  # bench.py must accept every flag gpu_check passes
            args = bench.parser().parse_args(cmd[cmd.index("scripts/bench.py") + 1:])
            parsed[name] = args
    assert set(parsed) == set(names) - {"tests"}
    assert all(a.device == "cuda" for n, a in parsed.items() if n != "env")
    r50 = parsed["r50_eager"]
    assert (r50.arch, r50.batch, r50.image_size, r50.amp, r50.channels_last) == \
        ("resnet50", 256, 224, "bf16", "true")
    assert parsed["r50_compiled"].compile and not r50.compile
    assert parsed["folder_loader"].workers == 16
    tests = commands[names.index("tests")]
    assert tests[:3] == [sys.executable, "-m", "pytest"] and "-k" in tests


def test_summarize_collects_each_parts_figures(tmp_path, bench_runs):
    """gpu_check's summary from real bench documents (the step run above, relabelled)."""
    bench = load_bench()
    step = bench_runs["step"][2]
    (tmp_path / "r50_eager.json").write_text(json.dumps(step))
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"><properties>'
        '<property name="grey_levels_mean_max" value="[0.8, 12]"/></properties></testcase>'
        '<testcase classname="tests.test_x" name="test_b"><failure/></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
        '</testsuite></testsuites>')
    speed = step["rows"][0]["ours"]["median"]  # a loader just faster than that step
    loader = bench.compare_row("folder wall", "images/s", [speed * 1.1], [speed / 2])
    (tmp_path / "folder_loader.json").write_text(json.dumps({"bench": "data",
                                                             "rows": [loader]}))
    (tmp_path / "parts.jsonl").write_text("\n".join(json.dumps(p) for p in [
        {"part": "tests", "rc": 1, "seconds": 5, "timeout_s": 170},
        {"part": "r50_eager", "rc": 0, "seconds": 9, "timeout_s": 100},
        {"part": "folder_loader", "rc": 0, "seconds": 30, "timeout_s": 120},
        {"part": "r50_compiled", "rc": 124, "seconds": 240, "timeout_s": 240}]) + "\n")
    assert bench.main(["summarize", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    tests, eager, folder, compiled = summary["parts"]
    assert (tests["status"], eager["status"], compiled["status"]) == ("failed", "ok", "timeout")
    assert tests["figures"]["failed"] == ["tests.test_x::test_b"]
    assert tests["figures"]["tests"] == 3 and tests["figures"]["skipped"] == 1
    assert tests["figures"]["properties"] == {
        "tests.test_x::test_a": {"grey_levels_mean_max": "[0.8, 12]"}}
    assert eager["figures"]["images_per_s"] == step["rows"][0]["ours"]["median"]
    assert eager["figures"]["host_reads_per_step"] == 0
    assert summary["ok"] is False
    assert folder["figures"]["folder wall"]["ratio"] == pytest.approx(2.2)
    assert summary["folder_loader_vs_r50"]["keeps_up"] is True
    assert [(g["part"], g["met"] is None) for g in summary["goals"]] == \
        [("r50_eager", False), ("r50_compiled", True)]


def test_on_a_gpu_machine_the_cuda_test_files_run_first(monkeypatch):
    """tests/conftest.py: with CUDA, GPU_FIRST's files lead in that order and the others
    follow in collection order; without, the order is untouched."""
    from types import SimpleNamespace

    import torch

    from . import conftest
    names = ["test_analyze.py", "test_bench.py", "test_data.py", "test_distributed.py",
             "test_engine.py", "test_engine.py", "test_zzz.py"]
    items = [SimpleNamespace(path=SimpleNamespace(name=n), i=i) for i, n in enumerate(names)]
    got = conftest.gpu_first(items)
    assert [(it.path.name, it.i) for it in got] == [
        ("test_engine.py", 4), ("test_engine.py", 5), ("test_data.py", 2),
        ("test_analyze.py", 0), ("test_bench.py", 1), ("test_distributed.py", 3),
        ("test_zzz.py", 6)]
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        collected = list(items)
        conftest.pytest_collection_modifyitems(None, collected)
        assert collected == (got if cuda else items)

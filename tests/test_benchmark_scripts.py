"""The training benchmark and the GPU check script: defaults are the paper configuration, a tiny benchmark runs
and prints its speed-up and peak-memory lines, and without a CUDA GPU the GPU check stops at once, saying so."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO_ROOT

SCRIPTS = REPO_ROOT / "bundle" / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def test_benchmark_defaults_are_the_paper_configuration():
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(_load("benchmark_training").run).parameters.items()}
    paper = yaml.safe_load((REPO_ROOT / "bundle" / "configs" / "paper.yaml").read_text())
    for key in ("batch_size", "queue_size", "order", "bn_splits", "init", "num_neighbours"):
        assert defaults[key] == paper[key], key
    assert defaults["num_landmarks"] == 581
    assert tuple(defaults["modes"]) == ("grouped", "per_sample")


def test_landmark_order_batch_has_one_landmark_and_location():
    bench = _load("benchmark_training")
    batch = bench.make_batch(6, 2, 581, "landmark", torch.device("cpu"), seed=1)
    assert batch["landmark_ids"].unique().numel() == 1
    assert (batch["location"] == batch["location"][0:1]).all()
    assert (batch["neighbour_locations"] == batch["neighbour_locations"][0:1]).all()
    assert batch["neighbours"].shape == (6, 2, 1, 32, 32, 32)
    mixed = bench.make_batch(6, 2, 581, "mixed", torch.device("cpu"), seed=1)
    assert mixed["landmark_ids"].unique().numel() > 1


def test_benchmark_refuses_a_batch_split_bn_cannot_cut():
    with pytest.raises(ValueError, match="at least 2 samples per split"):
        _load("benchmark_training").run(batch_size=4, bn_splits=4, queue_size=16)


def test_benchmark_tiny_run_prints_speedup_and_peak_memory(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "benchmark_training.py"),
            "--batch_size",
            "4",
            "--queue_size",
            "16",
            "--repeats",
            "1",
            "--bn_splits",
            "2",
            "--json_out",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert re.search(r"^speed-up grouped vs per_sample: \d+\.\d+x$", text, re.M), text
    assert re.search(r"^peak resident memory \d+\.\d+ GiB", text, re.M), text
    assert re.search(r"^grouped: \d+\.\d+ s/step .* query patches/s", text, re.M), text
    assert re.search(r"^load average before \(1/5/15 min\): ", text, re.M), text
    assert "order landmark, bn_splits 2, init reference" in text
    result = json.loads((tmp_path / "bench.json").read_text())
    grouped = result["results"]["amp_off"]["grouped"]
    assert grouped["speedup_vs_per_sample"] > 0 and len(grouped["times"]) == 1
    # Same weights, batch and permutation: the first steps of both variants give the same loss.
    assert grouped["first_loss_rel_diff_vs_per_sample"] < 1e-4
    assert result["machine"]["peak_rss_gib"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: gpu_check.sh would run")
def test_gpu_check_without_cuda_says_so_on_one_line_and_stops(tmp_path):
    log = tmp_path / "logs" / "gpu_check.log"
    out = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env=_env(PYTHON=sys.executable, GPU_CHECK_LOG=str(log)),
    )
    assert out.returncode != 0
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], lines
    assert "needs a CUDA GPU" in log.read_text()
    assert not (tmp_path / "logs" / "gpu_check.json").exists()  # nothing ran, no summary

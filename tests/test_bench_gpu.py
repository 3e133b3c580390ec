"""benchmarks/bench_gpu.py: everything but the GPU runs here, on a tiny model on the CPU, so a short loan of a
GPU is not spent on a bug in the script."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import ROOT


def test_the_gpu_benchmark_runs_end_to_end_on_a_tiny_model_on_the_cpu():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--device", "cpu",
                          "--pairs", "12", "--batch-tokens", "1024", "4096", "--layer", "1", "--max-length", "128",
                          "--agreement-pairs", "4"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| 1,024 |") or line.startswith("| 4,096 |")]
    assert len(table) == 2
    assert "SAE training:" in run.stdout and "bfloat16 vs float32 at layer 1" in run.stdout


def test_without_the_device_it_says_so_and_exits_2():
    code = ("import runpy, sys, torch; torch.cuda.is_available = lambda: False; "
            f"sys.argv = ['bench_gpu.py']; runpy.run_path({str(ROOT / 'benchmarks' / 'bench_gpu.py')!r}, "
            "run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "no CUDA device here" in run.stderr

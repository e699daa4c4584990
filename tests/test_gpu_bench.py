"""bench/gpu.py --small: the GPU benchmark's code path, on the CPU with tiny random models."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_small_runs_and_reports_gpu_oom():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py"), "--small"],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr[-4000:]
    for header in ("### LLM alone", "### Image alone", "### LLM and image together",
                   "### OOM case"):
        assert header in out, out
    for row in ("model.generate in-process", "pipeline called in-process",
                'preemption "adaptive"', 'preemption "always"', "isolation = false"):
        assert row in out, out
    # no GPU here: the MPS row says MPS did not start and why, instead of a timeslice run
    mps = [line for line in out.splitlines() if 'gpu_compute "mps"' in line]
    assert any("MPS not in effect" in line for line in mps), out
    assert any("MPS not in effect (no local worker uses a GPU)" in line for line in mps), out
    oom = [line for line in out.splitlines() if line.startswith("gpu_oom case:")]
    assert oom and "error gpu_oom" in oom[0] and "next request -> result" in oom[0], out
    assert "simulated" in oom[0]  # under --small the OOM comes from the null engine, and says so

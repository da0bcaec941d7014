"""Device meshes: tests/mesh_checks.py in a pytest process of its own with 8 CPU devices (jax_num_cpu_devices), so
that this session keeps its single device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_mesh_checks_pass_on_8_cpu_devices(smollm2_dir):
    tests = Path(__file__).parent
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8"}
    run = subprocess.run([sys.executable, "-m", "pytest", str(tests / "mesh_checks.py"), "-q", "-s", "-p",
                          "no:cacheprovider", "--rootdir", str(tests.parent)],
                         env=env, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-20000:], run.stderr[-5000:])
    assert run.returncode == 0, "the 8-device mesh checks failed (their output is above)"
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1]

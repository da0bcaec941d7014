"""Several processes as one mesh (`jaxllm generate --coordinator ...`), and the command line's mesh flags."""

import os
import socket
import subprocess
import sys
import time

import pytest

from jaxllm.cli import main

PROMPT = "The capital of France is"
DEADLINE_S = 240  # both processes together; a normal run takes 30-45 s on two cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("devices, mesh", [
    # Two CPU devices each: one mesh of four, dp across all of them (SmolLM2's 3 KV heads allow tp 1 or 3).
    (2, "dp=4"),
    # Three each: one mesh of six, a tp row of three in each process and dp across the two, so the parameters are
    # sharded as well as the batch and the cache.
    (3, "dp=2,tp=3"),
])
def test_two_processes_generate_what_one_does_and_only_process_0_prints(smollm2_dir, tmp_path, capsys, devices, mesh):
    assert main(["generate", PROMPT, "--model", str(smollm2_dir), "-n", "8"]) == 0
    expected = capsys.readouterr().out
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    coordinator = f"127.0.0.1:{_free_port()}"
    processes, deadline = [], time.monotonic() + DEADLINE_S
    try:
        for i in range(2):
            command = [sys.executable, "-m", "jaxllm", "generate", PROMPT, "--model", str(smollm2_dir), "-n", "8",
                       "--mesh", mesh, "--coordinator", coordinator, "--num-processes", "2",
                       "--process-id", str(i)]
            # Files, not pipes: a process that fills an unread pipe would block.
            with open(tmp_path / f"{i}.out", "w") as out, open(tmp_path / f"{i}.err", "w") as err:
                processes.append(subprocess.Popen(command, stdout=out, stderr=err, env=env))
        # Until both end, one fails (the other would wait for its peer) or the deadline passes (a hang).
        while (any(p.poll() is None for p in processes) and not any(p.returncode for p in processes)
               and time.monotonic() < deadline):
            time.sleep(0.5)
    finally:
        for p in processes:  # none outlives the test: killed, its status is -9
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [(tmp_path / f"{i}.err").read_text()[-3000:] for i in range(2)]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert (tmp_path / "0.out").read_text() == expected
    assert (tmp_path / "1.out").read_text() == ""


@pytest.mark.parametrize("flags, named", [
    (["--mesh", "tp=x"], "'tp=x'"),
    (["--mesh", "pp=2"], "'pp=2'"),
    (["--coordinator", "127.0.0.1:1234"], "--num-processes"),
    (["--mesh", "dp=64"], "dp=64"),
])
def test_bad_mesh_and_coordinator_flags_are_readable_errors(smollm2_dir, capsys, flags, named):
    assert main(["generate", PROMPT, "--model", str(smollm2_dir), "-n", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err

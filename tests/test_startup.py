"""What a start costs: the programs kept on disk (jaxllm.model.programs), the imports a command pays, the PRNG key
made without a trace. The command line's own warm start is in test_cli.py (test_a_warm_second_process_traces_nothing)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.generation import seed_key
from jaxllm.model import programs

# A fresh process: it runs `code` with the program store in `folder`, calling a small program with a static argument
# and a donated one, and prints its results and how many times it was traced.
TOY = """
import sys, jax, jax.numpy as jnp
from jaxllm.model import programs
programs.keep_programs(sys.argv[1])

def step(x, y, *, n):
    return x * n + y.sum(), y + 1

toy = programs.program(step, "toy", static_argnames=("n",), donate_argnames="y")
y = jnp.arange(4.0)
a, b = toy(jnp.ones(3), y, n=2)
assert y.is_deleted()  # donated, also when the executable was read from the disk
c, _ = toy(jnp.ones(3), b, n=3)  # another static value: another program
d, _ = toy(jnp.ones((2, 3)), jnp.arange(4.0), n=2)  # another shape: another program
print(a.tolist(), c.tolist(), d.tolist(), programs.compile_counts()["toy"])
"""


def _toy(folder) -> str:
    done = subprocess.run([sys.executable, "-c", TOY, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_programs_are_kept_by_shape_and_static_arguments_and_loaded_without_a_trace(tmp_path):
    first = _toy(tmp_path)
    assert first.endswith(" 3")  # three programs traced and compiled
    assert len(list(tmp_path.glob("toy-*.jaxexe"))) == 3
    second = _toy(tmp_path)
    assert second == first[:-1] + "0"  # the same results, nothing traced
    for path in tmp_path.glob("toy-*.jaxexe"):  # damaged or cut short: compiled again, not a crash
        path.write_bytes(path.read_bytes()[:100])
    assert _toy(tmp_path) == first
    assert _toy(tmp_path) == second


def test_a_program_is_traced_again_when_jaxllm_source_changes(tmp_path, monkeypatch):
    """The key holds a digest of jaxllm's source: programs stored by other code are not used."""
    programs.keep_programs(tmp_path)
    try:
        toy = programs.program(lambda x: x + 1, "toy_source")
        toy(jnp.ones(2))
        assert programs.compile_counts()["toy_source"] == 1
        toy2 = programs.program(lambda x: x + 2, "toy_source")  # a new process's program: nothing in memory
        assert float(toy2(jnp.ones(2))[0]) == 2.0 and programs.compile_counts()["toy_source"] == 1  # from the disk
        monkeypatch.setattr(programs, "_environment", lambda: "other source")
        toy3 = programs.program(lambda x: x + 3, "toy_source")
        assert float(toy3(jnp.ones(2))[0]) == 4.0 and programs.compile_counts()["toy_source"] == 2
    finally:
        programs.keep_programs(None)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31, 2**32 - 1, 2**32, -1])
def test_seed_key_is_jax_random_key(seed):
    assert np.array_equal(jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed)))


def test_generate_imports_no_more_than_it_needs():
    """`jaxllm generate`'s modules import neither torch, Transformers, the serving engine, flax nor chex (chex is
    imported at the first trace, which a warm start never runs)."""
    code = ("import sys, jaxllm, jaxllm.cli, jaxllm.generation, jaxllm.loader, jaxllm.hub; "
            "print(sorted(m for m in ('torch', 'transformers', 'jaxllm.engine', 'jaxllm.server', 'flax', 'chex', "
            "'gguf', 'tqdm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

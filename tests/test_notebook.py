"""The day-27 capstone notebook: it runs top to bottom in a fresh kernel on the real default model, agrees with
Transformers, plots the diff ladder and writes its JSON record; the committed file carries no outputs.

The notebook is executed once for the module (about a minute on two CPU cores), in a temporary working directory,
by a `python3` kernel that is this interpreter and imports this checkout's jaxllm.
"""

import base64
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest

import jaxllm
from jaxllm import parity
from jaxllm.tokenizer import Tokenizer

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "day27_capstone.ipynb"
KERNEL = "python3"
OUTPUT_KEYS = {
    "model", "prompt", "prompt_ids", "max_new_tokens", "output_text", "output_ids", "finish_reason",
    "transformers_greedy_ids", "greedy_agree", "max_abs_diff", "per_position_max_abs_diff", "argmax_agreement",
    "tolerance", "ladder_first_divergent", "ladder_relative_tolerance", "versions",
}


def this_interpreter_kernelspec(jupyter_dir: Path) -> Path:
    """A `python3` kernelspec under jupyter_dir/kernels that launches sys.executable. With jupyter_dir first on
    JUPYTER_PATH it wins over any user or system `python3` spec, which may name another Python."""
    from ipykernel.kernelspec import write_kernel_spec

    write_kernel_spec(jupyter_dir / "kernels" / KERNEL)
    return jupyter_dir


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(executed notebook, its JSON record, the JSON's path); a cell that raises fails every test that uses this."""
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("day27")  # the kernel's cwd: nothing may depend on the repository's
    out = workdir / "results" / "capstone.json"
    # The kernel inherits this environment. PYTHONPATH leads with the checkout the test imports, so the kernel
    # runs this code whether or not jaxllm is installed and whatever its cwd.
    package_root = str(Path(jaxllm.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(this_interpreter_kernelspec(workdir / "jupyter")))
        env.setenv("PYTHONPATH", pythonpath)
        env.setenv("JAXLLM_NOTEBOOK_OUT", str(out))
        env.setenv("HF_HUB_OFFLINE", "1")
        assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
        NotebookClient(notebook, kernel_name=KERNEL, timeout=600,
                       resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook, json.loads(out.read_text(encoding="utf-8")), out


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == KERNEL
    for cell in code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has saved outputs"
        assert "execution" not in cell.metadata, f"cell {cell.id} has saved execution timings"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_without_error(executed):
    notebook, _, _ = executed
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    errors = [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert errors == []


@pytest.mark.slow
def test_record_has_every_field_and_is_written_atomically(executed):
    _, record, out = executed
    assert OUTPUT_KEYS <= set(record)
    assert list(out.parent.iterdir()) == [out]  # the temporary file was renamed into place, none left behind


@pytest.mark.slow
def test_greedy_text_is_jaxllms_and_matches_transformers(executed, smollm2_dir):
    _, record, _ = executed
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    assert record["prompt"] == "The capital of France is"
    assert record["prompt_ids"] == tokenizer.encode(record["prompt"])
    assert len(record["output_ids"]) == record["max_new_tokens"] == 20
    assert record["output_text"] == tokenizer.decode(record["output_ids"], skip_special_tokens=True)
    assert "Paris" in record["output_text"]
    assert record["output_ids"] == record["transformers_greedy_ids"] and record["greedy_agree"]


@pytest.mark.slow
def test_recorded_logit_diff_is_within_real_model_tolerance(executed):
    _, record, _ = executed
    assert record["tolerance"] == parity.REAL_MODEL_TOLERANCE == 2e-4
    assert 0 < record["max_abs_diff"] <= parity.REAL_MODEL_TOLERANCE
    assert record["argmax_agreement"] == 1.0
    assert record["ladder_first_divergent"] is None


@pytest.mark.slow
def test_ladder_plot_is_rendered_as_png(executed):
    notebook, _, _ = executed
    pngs = [base64.b64decode(output.data["image/png"]) for cell in code_cells(notebook) for output in cell.outputs
            if "image/png" in output.get("data", {})]
    assert len(pngs) == 1 and pngs[0].startswith(b"\x89PNG")

"""The `jaxllm` command as a user runs it: streamed generation, inspect, parity reports, convert, readable errors."""

import json
import subprocess
import sys

import pytest

from jaxllm.cli import build_parser, main


def test_generate_streams_the_continuation(smollm2_dir, capsys):
    assert main(["generate", "The capital of France is", "--model", str(smollm2_dir), "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is Paris")


def test_generate_chat_uses_the_chat_template(smollm2_dir, capsys):
    assert main(["generate", "What is the capital of France?", "--chat", "--model", str(smollm2_dir), "-n", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_inspect_shows_config_tensors_and_layer0_map(smollm2_dir, capsys):
    assert main(["inspect", "--model", str(smollm2_dir)]) == 0
    out = capsys.readouterr().out
    assert "num_key_value_heads        3" in out
    assert "model.layers.29.mlp.down_proj.weight" in out and "[576, 1536]" in out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "[N·H, D] = [576, 576]" in out
    assert "[K·H, D] = [192, 576]" in out and "-> layers[0].qkv_proj[:, 3:4]" in out


def test_parity_writes_a_report_and_passes(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["parity", "--model", str(smollm2_dir), "--prompt", "The capital of France is", "-n", "8",
                 "--ladder", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("prompt", "prompt_ids", "max_abs_diff", "noise_floor_fp32_vs_fp64", "jaxllm_vs_fp64",
                "per_position_max_abs_diff", "argmax_agreement", "jaxllm_greedy", "transformers_greedy", "ladder"):
        assert key in report
    assert report["ok"] and report["max_abs_diff"] <= 2e-4 and report["greedy_agree"]
    assert len(report["per_position_max_abs_diff"]) == len(report["prompt_ids"])
    assert report["jaxllm_greedy"]["ids"] == report["transformers_greedy"]["ids"]
    assert report["ladder"]["first_divergent"] is None
    printed = capsys.readouterr().out
    assert "noise floor" in printed and "first divergent component: none" in printed and "PASS" in printed


def test_generate_and_serve_take_a_self_draft(smollm2_dir, capsys):
    """`--self-draft N` speculates with the model's first N layers and prints the plain greedy text; a bad layer
    count or a second proposer is one readable line, before any server starts."""
    assert main(["generate", "The capital of France is", "--model", str(smollm2_dir), "-n", "8", "--self-draft",
                 "2"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris")
    assert main(["generate", "hi", "--model", str(smollm2_dir), "--speculate", "lookup", "--self-draft", "2"]) == 2
    assert "speculate='lookup' takes no draft model" in capsys.readouterr().err
    assert main(["serve", "--model", str(smollm2_dir), "--port", "0", "--self-draft", "30"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a self-draft takes 1 to 29 of the target's 30 layers, found 30" in err


def test_generate_with_quantized_weights(capsys):
    assert main(["generate", "The capital of France is", "--weights", "int8", "-n", "8"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris")


def test_parity_reports_a_weight_format_against_fp32_and_transformers(tmp_path, capsys):
    out = tmp_path / "gguf.json"
    assert main(["parity", "--weights", "gguf", "-n", "8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"].endswith(".gguf") and report["weights"] == "gguf" and report["positions"] > 150
    assert set(report["against"]) == {"jaxllm fp32", "transformers fp32"}
    fp32, hf = report["against"]["jaxllm fp32"], report["against"]["transformers fp32"]
    assert fp32["max_abs_diff"] <= 2e-4 and fp32["kl_mean"] < 1e-8 and fp32["top1_agreement"] == 1.0
    assert hf["max_abs_diff"] <= 2e-4 and hf["top1_agreement"] == 1.0
    assert [g["vs_jaxllm_fp32"] for g in report["greedy"]] == [8] * 5  # the blocks are the model: no divergence
    printed = capsys.readouterr().out
    assert "KL mean" in printed and "greedy agreement over 8 tokens" in printed


def test_convert_writes_an_hf_directory(smollm2_gguf, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", str(smollm2_gguf), str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                "tokenizer_config.json", "generation_config.json"}
    assert main(["convert", str(smollm2_gguf), str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_errors_are_one_readable_line(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err and "Traceback" not in err
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")
    assert main(["inspect", "--model", str(tmp_path)]) == 2
    assert "required field 'model_type' is missing" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "inspect", "parity", "convert", "bench", "bench-serve", "serve"])
def test_every_command_has_help(command):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "jaxllm", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "generate" in done.stdout and "parity" in done.stdout


# `jaxllm generate ...` in a fresh process that also counts the traces JAX runs (any program, jaxllm's or JAX's own).
COUNTING = """
import sys, jax.monitoring
traces = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: traces.append(event) if event == "/jax/core/compile/jaxpr_trace_duration" else None)
from jaxllm.cli import main
code = main(sys.argv[1:])
print(f"traces={len(traces)}", file=sys.stderr)
sys.exit(code)
"""


def test_a_warm_second_process_traces_nothing(smollm2_dir, tmp_path):
    """The first process compiles and stores its programs (serialized executables in the jaxllm cache folder); a
    second loads them, traces nothing at all and prints the same text. A damaged stored program is compiled again,
    with the same text. JAXLLM_COMPILE_CACHE=0 keeps the folder untouched."""
    import os

    command = [sys.executable, "-c", COUNTING, "generate", "The capital of France is", "--model", str(smollm2_dir),
               "-n", "4"]
    env = {**os.environ, "JAXLLM_CACHE": str(tmp_path / "cache"), "JAXLLM_COMPILE_CACHE": "1"}
    stored = tmp_path / "cache" / "programs"

    def run(environment):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
        assert done.returncode == 0, done.stderr
        return done.stdout, int(done.stderr.rsplit("traces=", 1)[1])

    first, first_traces = run(env)
    assert first.startswith("The capital of France is") and first_traces > 0
    programs = sorted(p.name for p in stored.glob("*.jaxexe"))
    assert [p.split("-")[0] for p in programs] == ["decode_step", "prefill"]
    second, second_traces = run(env)
    assert (second, second_traces) == (first, 0)
    assert sorted(p.name for p in stored.glob("*.jaxexe")) == programs  # nothing compiled anew

    (stored / programs[0]).write_bytes(b"not an executable")
    damaged, damaged_traces = run(env)
    assert damaged == first and damaged_traces > 0
    assert run(env) == (first, 0)  # the damaged file was replaced

    off, _ = run({**env, "JAXLLM_CACHE": str(tmp_path / "off"), "JAXLLM_COMPILE_CACHE": "0"})
    assert off == first
    assert not (tmp_path / "off").exists()

"""The benchmark on the real default model, at a tiny size: the report's structure and sanity, never its speed."""

import contextlib
import io
import json
import math

import pytest

from jaxllm import bench, cli

# Smaller than QUICK so the module stays well under a minute and a half; one repeat is enough for structure.
TINY = bench.Settings(prefill_lengths=(16,), decode_tokens=8, nocache_tokens=4, session_lengths=(3, 7, 12, 20),
                      session_tokens=4, matrix=(2048, 4096), roofline_pairs=3, max_repeats=1)


FORMATS = ("fp32", "int8")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One `jaxllm bench --quick -w fp32,int8 --json` at the TINY size: (the JSON it wrote, the table it printed)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(bench, "QUICK", TINY)
        assert cli.main(["bench", "--quick", "--weights", ",".join(FORMATS), "--repeats", "3", "--json",
                         str(out)]) == 0
    return json.loads(out.read_text()), printed.getvalue()


@pytest.fixture(scope="module")
def figures(report):
    return report[0]


def numbers(tree):
    """Every number in a nested dict/list, with its path."""
    if isinstance(tree, dict):
        return [(f"{k}.{p}" if p else k, v) for k, sub in tree.items() for p, v in numbers(sub)]
    if isinstance(tree, list):
        return [(f"{i}.{p}" if p else str(i), v) for i, sub in enumerate(tree) for p, v in numbers(sub)]
    return [("", tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_figures_cover_every_section(figures):
    assert set(figures) == {"environment", "compile", "decode", "prefill", "roofline", "session", "formats"}
    assert [row["tokens"] for row in figures["prefill"]] == list(TINY.prefill_lengths)
    assert figures["decode"]["new_tokens"] == TINY.decode_tokens
    assert figures["environment"]["transformers_attention"] == "sdpa"
    assert figures["environment"]["repeats"] == 1  # capped by the settings


def test_timings_and_ratios_are_positive_and_finite(figures):
    timed = [(path, v) for path, v in numbers(figures)
             if path.endswith(("_ms", "_s", "tokens_per_s", "gb_per_s", "ratio_vs_prefill", "ratio_vs_forward"))
             or "ratio_" in path or "fraction" in path]
    assert len(timed) > 20
    for path, value in timed:
        assert math.isfinite(value) and value > 0, f"{path} = {value}"


def test_roofline_fraction_is_the_median_of_side_by_side_pairs(figures):
    roof = figures["roofline"]
    assert roof["pairs"] == TINY.roofline_pairs
    low, high = roof["jaxllm_fraction_range"]
    assert 0 < low <= roof["jaxllm_fraction"] <= high
    low, high = roof["bandwidth_range_gb_per_s"]
    assert low <= roof["bandwidth_gb_per_s"] <= high
    assert roof["weight_bytes"] > roof["kv_cache_bytes"] > 0


def test_compile_figures_count_real_compiles(figures):
    compile_ = figures["compile"]
    assert compile_["programs_compiled"]["prefill"] == 1
    assert compile_["programs_compiled"]["decode"] == 1


def test_lengths_in_compiled_buckets_compile_nothing(figures):
    session = figures["session"]
    assert session["buckets"] == [16, 32]
    assert session["session_compiles"] == {name: 0 for name in session["session_compiles"]}


def test_greedy_decode_is_the_same_in_both_engines(figures):
    assert figures["decode"]["greedy_tokens_agree"] == TINY.decode_tokens


def test_table_shows_every_section(figures):
    text = bench.table(figures)
    for heading in ("Prefill / forward latency", "Decode:", "Memory roofline", "Compiles", "Weight formats side by side"):
        assert heading in text


def test_formats_side_by_side(figures):
    f = figures["formats"]
    assert list(f["formats"]) == list(FORMATS) and f["first"] == "fp32" and f["rounds"] == TINY.roofline_pairs
    fp32, int8 = f["formats"]["fp32"], f["formats"]["int8"]
    assert fp32["decode_vs_first"] == 1.0 and int8["decode_vs_first"] > 0
    # Bytes read per token: every weight once; int8 reads about a quarter (the outlier-input matrices stay fp32).
    assert 0.2 < int8["weight_bytes_per_token"] / fp32["weight_bytes_per_token"] < 0.35
    assert list(int8["prefill_ms"]) == [str(n) for n in TINY.prefill_lengths]
    for row in (fp32, int8):
        memory = row["load_memory"]
        assert memory["param_bytes"] == row["weight_bytes_per_token"]
        assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0 and memory["peak_over_params"] > 0
        low, high = row["decode_tokens_per_s_range"]
        assert low <= row["decode_tokens_per_s"] <= high and 0 < row["roofline_fraction"]
    llama = f["llama_cpp"]
    assert ("skipped" in llama) != ("decode_tokens_per_s" in llama)
    if "skipped" not in llama:  # llama-cpp-python installed: it ran on the default model's GGUF
        assert llama["gguf"].endswith(".gguf") and set(llama["jaxllm_over_llama_cpp"]) == set(FORMATS)


@pytest.mark.parametrize("weights", ["int8", "gguf"])
def test_quantized_loads_peak_within_one_and_a_half_times_their_parameters(smollm2_dir, smollm2_gguf, weights):
    """A fresh process loading the default model as int8 or as GGUF blocks peaks (VmHWM, above the runtime's baseline)
    at no more than 1.5x the parameters' bytes: int8 quantizes and calibrates a layer at a time, and the GGUF's
    vocabulary stays bytes in the file until a tokenizer is built."""
    memory = bench._peak_load_memory(None, weights)
    print(f"{weights} load memory: {memory}")
    assert "error" not in memory, memory
    assert 0 < memory["peak_over_params"] <= 1.5, memory


def test_cli_bench_writes_json_and_prints_the_table(report):
    figures, printed = report
    assert figures["environment"]["quick"] is True
    assert bench.table(figures) in printed  # the table of the figures the JSON holds
    assert "Memory roofline" in printed and "Weight formats side by side" in printed


def test_cli_bench_names_a_bad_weight_format(capsys):
    assert cli.main(["bench", "--weights", "fp32,int9"]) == 2
    assert "weights must be one of fp32, bf16, int8, gguf; found 'int9'" in capsys.readouterr().err


def test_startup_bench_times_whole_processes_warm_and_cold(smollm2_dir, tmp_path, monkeypatch, capsys):
    """`jaxllm bench --startup`: whole `jaxllm generate` processes, their programs kept in a folder of this test's
    own; the warm ones load them (no compile), the cold ones compile everything, both print the same text."""
    monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path / "cache"))
    assert cli.main(["bench", "--startup", "--model", str(smollm2_dir), "--repeats", "1",
                     "--json", str(tmp_path / "startup.json")]) == 0
    printed = capsys.readouterr().out
    assert "Startup: a whole `jaxllm generate" in printed and "llama-cpp-python" in printed
    figures = json.loads((tmp_path / "startup.json").read_text())
    warm, cold = figures["jobs"]["jaxllm warm"], figures["jobs"]["jaxllm cold"]
    assert warm["text"] == cold["text"] and warm["text"].startswith("The capital of France is")
    for job in (warm, cold):
        assert set(job["phases_s"]) == {"before the command", "imports", "load", "first token", "the rest"}
        assert all(v >= 0 for v in job["phases_s"].values())
        assert sum(job["phases_s"].values()) == pytest.approx(job["wall_s"], abs=0.05)
    assert warm["phases_s"]["first token"] < cold["phases_s"]["first token"]  # loaded, not compiled
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "programs").glob("*.jaxexe")) == [
        "decode_step", "prefill"]


def test_speculation_bench_reports_acceptance_and_identical_outputs(smollm2_dir, tmp_path, capsys):
    """`jaxllm bench --speculate --quick`: one input-grounded and one open-ended chat prompt on the default model; the
    lookup outputs equal the plain ones and the table names every column."""
    assert cli.main(["bench", "--speculate", "--quick", "--model", str(smollm2_dir), "-w", "fp32", "--repeats", "1",
                     "--json", str(tmp_path / "speculate.json")]) == 0
    printed = capsys.readouterr().out
    assert "Prompt lookup against plain greedy decode" in printed and "lookup/plain" in printed
    assert "llama-cpp-python" in printed
    figures = json.loads((tmp_path / "speculate.json").read_text())
    for kind in ("input-grounded", "open-ended"):
        r = figures["formats"]["fp32"][kind]
        assert r["identical"] and 0 <= r["acceptance"] <= 1 and r["tokens_per_step"] >= 1
        assert all(v > 0 for v in r["tok_s"].values())
        (p,) = r["prompts"]  # --quick: one prompt a kind
        assert p["tokens"] > 0 and p["tokens_per_step"] >= 1 and p["lookup_over_plain"] > 0
        assert " ".join(p["prompt"].split())[:48] in printed

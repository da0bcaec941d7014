"""The `jaxllm` command: generate, inspect, parity, convert, bench, serve."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "The capital of France is"


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model directory, .gguf file, Hub repo id, or 'smollm2-135m' (the default)")


def _weights_arg(p: argparse.ArgumentParser, what: str = "the weight format") -> None:
    from jaxllm.weights import FORMATS

    p.add_argument("--weights", "-w", choices=FORMATS, default="fp32",
                   help=f"{what}: fp32 (default), bf16, int8 (quantized as it loads) or gguf (a .gguf's quantized "
                        "blocks kept as stored; the default model's GGUF for the default model)")


def _compile_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile every program anew instead of reusing those kept in the jaxllm cache folder "
                        "(also: JAXLLM_COMPILE_CACHE=0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="A LLaMA-family inference engine in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="stream the continuation of a prompt (greedy by default)")
    p.add_argument("prompt", help="the prompt text")
    _model_arg(p)
    p.add_argument("--max-new-tokens", "-n", type=int, default=20)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (instruct models)")
    p.add_argument("--no-cache", action="store_true", help="run the full forward every step (the reference path)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--speculate", choices=("lookup",), help="propose tokens by prompt lookup and verify them in one "
                                                             "forward (the output is unchanged)")
    p.add_argument("--self-draft", type=int, metavar="LAYERS", help="speculate with the model's first LAYERS layers "
                                                                    "as the draft (the output is unchanged)")
    p.add_argument("--mesh", help="shard over a mesh of devices, e.g. dp=2,tp=4 (either may be left out: all devices, "
                                  "dp taking what tp leaves)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="run as one of several processes (process 0's address; "
                                                              "with --num-processes and --process-id)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--timings", action="store_true", help="print to stderr where the time went: imports, load, first "
                                                          "token, the rest")
    _weights_arg(p)
    _compile_cache_arg(p)

    p = sub.add_parser("inspect", help="show the config, every tensor, and the layer-0 weight map")
    _model_arg(p)
    p.add_argument("--weights", "-w", choices=("fp32", "bf16", "int8", "gguf"),
                   help="also load the parameters in this format and show each matrix's format and bytes")

    p = sub.add_parser("parity", help="compare logits and greedy tokens with Transformers (needs the test extra)")
    _model_arg(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", "-n", type=int)
    p.add_argument("--out", type=Path, help="write the JSON report here")
    p.add_argument("--ladder", action="store_true", help="also run the component-by-component diff ladder")
    _weights_arg(p, "compare this format with fp32 jaxllm and Transformers fp32 (KL, top-1, greedy agreement "
                    "over --max-new-tokens, 64 by default for a format other than fp32) instead")
    _compile_cache_arg(p)

    p = sub.add_parser("convert", help="convert a GGUF file to an HF-format directory")
    p.add_argument("gguf", type=Path, help="the .gguf file")
    p.add_argument("out_dir", type=Path, help="the directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")

    p = sub.add_parser("bench", help="jaxllm and Transformers side by side: prefill latency, decode tokens/s")
    _model_arg(p)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (medians are reported)")
    p.add_argument("--quick", action="store_true", help="fewer lengths and tokens, for a smoke run")
    p.add_argument("--weights", "-w", default="fp32",
                   help="jaxllm's weight formats, comma-separated (fp32,bf16,int8,gguf), measured side by side in one "
                        "run; Transformers runs in fp32. With a format other than fp32, llama.cpp runs too when "
                        "llama-cpp-python is installed")
    p.add_argument("--startup", action="store_true",
                   help="instead: whole `jaxllm generate` processes, warm and cold, with where the time goes, "
                        "alternating with llama-cpp-python doing the same job when it is found")
    p.add_argument("--speculate", action="store_true",
                   help="instead: prompt lookup against plain greedy decode on input-grounded and open-ended chat "
                        "prompts, in each --weights format (acceptance, tokens per step, tokens/s), beside "
                        "llama-cpp-python's LlamaPromptLookupDecoding when it is found")
    p.add_argument("--llama-cpp-python", metavar="PYTHON", help="with --startup or --speculate: a Python with "
                   "llama-cpp-python (default: $JAXLLM_LLAMA_CPP_PYTHON, this one, or ../llamacpp-venv)")
    p.add_argument("--moe", action="store_true",
                   help="instead: a random mixture-of-experts model (32 experts, top 2) against a dense one with the "
                        "same active parameters, in each --weights format: decode tokens/s and prefill ms")

    p = sub.add_parser("bench-serve", help="load an OpenAI-compatible server with streamed completions, as `vllm bench "
                                           "serve` does: TTFT, inter-token latency, output tokens/s per concurrency")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (ignored with --side-by-side)")
    p.add_argument("--model", "-m", default=None,
                   help="the model field of each request (default: the first the server lists at /v1/models); with "
                        "--side-by-side, the model every server runs (default: the default model)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,2,4,8", help="the levels: most requests in flight, comma-separated")
    p.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s (default: all at once, "
                                              "bounded by the concurrency)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="about this many tokens in each prompt")
    p.add_argument("--output-tokens", type=int, default=64, help="max_tokens of each request (EOS ignored)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take; then it has failed")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--label", help="the server's name in the table (default: the URL)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--side-by-side", nargs="?", const="jaxllm,llama-cpp-python,transformers", metavar="SERVERS",
                   help="start each server in turn on a free port, load it the same way, stop it, one table (default "
                        "servers: jaxllm,llama-cpp-python,transformers; those that cannot run here are skipped)")
    p.add_argument("--weights", "-w", default="fp32", help="with --side-by-side: jaxllm's weight formats, "
                                                            "comma-separated, one server each")
    p.add_argument("--slots", type=int, default=8, help="with --side-by-side: jaxllm serve's --slots")
    p.add_argument("--engine", action="store_true", help="instead, measure the engine in this process: decode "
                   "ms/step with every slot busy for each --weights at --max-context 512 and 8192, and the running "
                   "streams' gaps while a 2,000-token prompt joins, prefilled in chunks and in one piece")
    p.add_argument("--llama-cpp-python", metavar="PYTHON", help="with --side-by-side: a Python with "
                   "llama-cpp-python[server] (default: $JAXLLM_LLAMA_CPP_PYTHON, this one, or ../llamacpp-venv)")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _model_arg(p)
    _weights_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                                                       "only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (the engine's batch)")
    p.add_argument("--max-context", type=int, default=2048, help="prompt + completion tokens of one request, at most")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per scheduler turn (tokens reach "
                                                               "clients in bursts of up to this many)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="a long prompt is prefilled this many tokens at a "
                                                                   "time, between decode steps of the running requests")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before new ones get 429")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--served-model-name", help="the name clients give as `model` (default: --model as given, or "
                                               "the default model's name)")
    p.add_argument("--mesh", help="shard over a mesh of devices, e.g. dp=2,tp=4 (as in generate)")
    p.add_argument("--speculate", choices=("lookup",), help="each slot proposes by prompt lookup over its own prompt "
                                                             "and output, verified in one forward (the same tokens)")
    p.add_argument("--self-draft", type=int, metavar="LAYERS", help="each slot speculates with the model's first "
                                                                    "LAYERS layers as the draft (the same tokens)")
    p.set_defaults(coordinator=None, num_processes=None, process_id=None)  # one process serves
    _compile_cache_arg(p)
    return parser


def cmd_generate(args) -> int:
    marks = {"start": args.started}
    import jax

    from jaxllm.generation import UNKNOWN_TOKEN, Sampling, generate, seed_key, self_draft
    from jaxllm.loader import load_model
    from jaxllm.model.programs import prefetch_recent, record_recent

    mesh = _mesh(args)
    tag = f"generate {args.model} {args.weights} {args.mesh} {args.no_cache}"
    prefetch_recent(tag)  # the last such run's programs load while the weights are read
    marks["imports"] = time.perf_counter()
    model = load_model(args.model, args.weights, mesh=mesh)
    marks["load"] = time.perf_counter()
    out = sys.stdout if jax.process_index() == 0 else io.StringIO()  # the others run the same steps, silently
    prompt = args.prompt
    if args.chat:  # the rendered template carries its own special tokens: encode it without adding BOS again
        chat = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt = model.tokenizer.encode(chat, add_special_tokens=False)
    stream = model.tokenizer.stream(skip_special_tokens=True, unknown=UNKNOWN_TOKEN)
    out.write(args.prompt if not args.chat else "")
    out.flush()

    def on_token(row: int, token: int) -> None:
        marks.setdefault("first token", time.perf_counter())
        out.write(stream.push(token))
        out.flush()

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    draft = None if args.self_draft is None else self_draft(model, args.self_draft)
    generate(model, prompt, args.max_new_tokens, use_cache=not args.no_cache, sampling=sampling,
             key=seed_key(args.seed), callback=on_token, speculate=args.speculate, draft=draft)
    out.write(stream.flush() + "\n")
    marks["the rest"] = time.perf_counter()
    record_recent(tag)
    if args.timings:
        steps = list(marks.items())
        print("timings: " + ", ".join(f"{name} {t - before:.3f} s" for (_, before), (name, t) in zip(steps, steps[1:]))
              + f"; total {steps[-1][1] - steps[0][1]:.3f} s from the command's start (imports: jax and jaxllm's modules)",
              file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from jaxllm import server
    from jaxllm.generation import self_draft
    from jaxllm.hub import DEFAULT_MODEL
    from jaxllm.loader import load_model

    model = load_model(args.model, args.weights, mesh=_mesh(args))
    name = args.served_model_name or args.model or DEFAULT_MODEL.name
    draft = None if args.self_draft is None else self_draft(model, args.self_draft)
    server.serve(model, name, host=args.host, port=args.port, api_key=args.api_key, slots=args.slots,
                 max_context=args.max_context, decode_steps=args.decode_steps, prefill_chunk=args.prefill_chunk,
                 max_waiting=args.max_waiting, speculate=args.speculate, draft=draft)
    return 0


def _mesh(args):
    """The mesh of --mesh and the coordinator flags, or None (one device). With --coordinator this process first
    joins the others, before anything touches JAX's devices."""
    from jaxllm.errors import InputError
    from jaxllm.loader import distributed, make_mesh

    joined = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in joined) and None in joined:
        raise InputError("--coordinator, --num-processes and --process-id go together: give all three or none")
    sizes = {}
    for part in args.mesh.split(",") if args.mesh is not None else ():
        key, _, value = part.partition("=")
        if key not in ("dp", "tp") or key in sizes or not value.isdigit() or int(value) < 1:
            raise InputError(f"--mesh {args.mesh!r}: {part!r} is not dp=N or tp=N (N a positive integer, "
                             f"each key at most once)")
        sizes[key] = int(value)
    if args.coordinator is not None:
        distributed(args.coordinator, args.num_processes, args.process_id)
        _text_only_stdout()
    return make_mesh(**sizes) if args.mesh is not None or args.coordinator is not None else None


def _text_only_stdout() -> None:
    """Gloo (the CPU collectives) prints its connection lines on the C stdout: point that at stderr and keep Python's
    stdout on the real one, so that stdout carries the generated text alone."""
    sys.stdout.flush()
    text = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = open(text, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def cmd_inspect(args) -> int:
    from jaxllm.config import LLMConfig
    from jaxllm.loader import layer_table, open_checkpoint

    checkpoint = open_checkpoint(args.model, gguf=args.weights == "gguf")
    config = checkpoint.config
    print(f"model: {checkpoint.path}\n\nconfig:")
    for f in dataclasses.fields(config):
        print(f"  {f.name:<26} {_short(getattr(config, f.name))}")
    llama = LLMConfig(**{f: getattr(config, f) for f in ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")})
    print(f"\nfamily {config.model_type}: what differs from Llama's forward")
    distinct = [f.name for f in dataclasses.fields(config) if f.name in FAMILY_FIELDS
                and getattr(config, f.name) != getattr(llama, f.name)]
    distinct += ["rope"] * (config.rope.rope_type == "longrope")  # Phi-3's; Llama's own RoPE types are not family
    for name in distinct:
        print(f"  {name:<26} {_family_value(config, name)}")
    if not distinct:
        print("  nothing: Llama's forward")
    print(f"\ntensors ({len(checkpoint.tensors)}):")
    for name, (shape, dtype) in checkpoint.tensors.items():
        print(f"  {name:<52} {str(list(shape)):<14} {dtype}")
    print("\nlayer-0 weight map, as stored ([out, in]) -> the jaxllm field (q/k/v grouped by kv head, gate/up stacked):")
    for e in layer_table(config, 0, checkpoint.stacked_experts):
        print(f"  {e.hf_name:<44} [{e.letters}] = {str(list(e.hf_shape)):<12} -> layers[0].{e.target}")
    if args.weights:
        _print_weights(args.model, args.weights)
    return 0


def _print_weights(model, weights: str) -> None:
    """Every parameter field in `weights`: its format, shape and bytes; a quantized one's parts too."""
    import math

    import jax

    from jaxllm.loader import MATRICES, load
    from jaxllm.weights import describe, is_quantized, nbytes

    params = load(model, weights)
    fields = [("embed_tokens", params.embed_tokens), ("lm_head", params.lm_head), ("norm", params.norm)]
    fields += [(f"layers.{i}.{name}", getattr(layer, name)) for i, layer in enumerate(params.layers)
               for name in layer.__dataclass_fields__ if getattr(layer, name) is not None]
    total, fp32 = nbytes(params), sum(4 * math.prod(value.shape) for _, value in fields if value is not None)
    print(f"\nweights {weights}: {total:,} bytes in memory ({total / 2**20:,.1f} MiB; the same parameters in fp32: "
          f"{fp32 / 2**20:,.1f} MiB)")
    if weights in ("int8", "gguf"):
        wide = [name for name, value in fields
                if value is not None and name.split(".")[-1] in MATRICES and not is_quantized(value)]
        print(f"  matrices not quantized: {', '.join(wide) or 'none'}" + (
            " (their inputs carry outlier activations: loader.Calibration)" if weights == "int8" and wide else ""))
    for name, value in fields:
        if value is None:
            continue
        print(f"  {name:<34} {describe(value)}")
        if is_quantized(value):
            parts = ", ".join(f"{f.name} {leaf.dtype} {list(leaf.shape)}" for f in dataclasses.fields(value)
                              if isinstance(leaf := getattr(value, f.name), jax.Array))
            print(f"  {'':<34}   = {parts}")


# LLMConfig fields that switch a family behaviour in the forward (config.py says what each does).
FAMILY_FIELDS = ("attention_bias", "qkv_bias", "mlp_bias", "hidden_act", "rotary_dim", "sliding_window", "layer_types",
                 "local_rope", "no_rope_layers", "qk_norm", "gemma_norms", "embed_scale", "query_pre_attn_scalar",
                 "attn_logit_softcapping", "final_logit_softcapping",
                 # experts, latent attention, gpt-oss and Granite
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_layers", "router", "norm_topk_prob",
                 "shared_expert_intermediate_size", "shared_expert_gated", "routed_scaling_factor", "n_group",
                 "topk_group", "qk_norm_full", "clip_qkv", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                 "v_head_dim", "attention_sinks", "swiglu_limit", "attention_multiplier", "residual_multiplier",
                 "logits_scaling")


def _short(value, limit: int = 6) -> str:
    """A config value on one line: long tuples (longrope factors, per-layer lists) cut to their first entries."""
    if isinstance(value, tuple) and len(value) > limit:
        return f"({', '.join(map(str, value[:limit]))}, ... {len(value)} in all)"
    if dataclasses.is_dataclass(value):  # RopeConfig: the fields that differ from its defaults
        default = type(value)()
        return f"{type(value).__name__}(" + ", ".join(
            f"{f.name}={_short(getattr(value, f.name), 3)}" for f in dataclasses.fields(value)
            if getattr(value, f.name) != getattr(default, f.name) or f.name == "theta") + ")"
    return str(value)


def _family_value(config, name: str) -> str:
    """Per-layer fields as the layers they pick out."""
    value = getattr(config, name)
    if name == "layer_types":
        full = [i for i, kind in enumerate(value) if kind == "full_attention"]
        return (f"{len(value) - len(full)} sliding_attention layers (window {config.sliding_window}), "
                f"{len(full)} full_attention: layers {_short(tuple(full), 12)}")
    if name == "no_rope_layers":
        return f"layers without RoPE: {_short(tuple(i for i, rope in enumerate(value) if not rope), 12)}"
    if name == "rotary_dim":
        return f"{value} of head_dim {config.head_dim} (partial_rotary_factor {value / config.head_dim:g})"
    return _short(value)


def cmd_parity(args) -> int:
    from jaxllm import parity
    from jaxllm.loader import resolve

    if args.weights != "fp32":
        report = parity.weights_report(args.model, args.weights, new_tokens=args.max_new_tokens or 64)
        print(parity.weights_summary(report))
        if args.out:
            _write_json(args.out, report)
            print(f"report written to {args.out}")
        return 0
    report = parity.report(resolve(args.model), args.prompt, args.max_new_tokens or 20, with_ladder=args.ladder)
    print(parity.summary(report))
    if args.out:
        _write_json(args.out, report)
        print(f"report written to {args.out}")
    return 0 if report["ok"] else 1


def cmd_convert(args) -> int:
    from jaxllm.convert import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite)
    print(f"converted {args.gguf} -> {out}")
    return 0


def cmd_bench(args) -> int:
    from jaxllm import bench

    from jaxllm.weights import check_format

    formats = tuple(check_format(w.strip()) for w in args.weights.split(","))
    if args.startup:
        figures = bench.startup(args.model, formats[0], repeats=args.repeats, llama_cpp_python=args.llama_cpp_python)
        print(bench.startup_table(figures))
    elif args.speculate:
        kinds = {"input-grounded": bench.GROUNDED[:1], "open-ended": bench.OPEN_ENDED[:1]} if args.quick else None
        figures = bench.speculation(args.model, formats, new_tokens=16 if args.quick else 96, repeats=args.repeats,
                                    kinds=kinds, llama_cpp_python=args.llama_cpp_python)
        print(bench.speculation_table(figures))
    elif args.moe:
        sizes = dataclasses.replace(bench.MOE_QUICK if args.quick else bench.MoeSizes(), rounds=args.repeats)
        figures = bench.moe(sizes, weights=formats)
        print(bench.moe_table(figures))
    else:
        figures = bench.run(args.model, repeats=args.repeats, quick=args.quick, weights=formats)
        print(bench.table(figures))
    if args.json:
        _write_json(args.json, figures)
        print(f"figures written to {args.json}")
    return 0


def cmd_bench_serve(args) -> int:
    from jaxllm import bench
    from jaxllm.errors import InputError
    from jaxllm.weights import check_format

    try:
        levels = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise InputError(f"--concurrency {args.concurrency!r}: expected positive integers, comma-separated")
    load = dict(requests=args.requests, concurrency=levels, rate=args.rate, prompt_tokens=args.prompt_tokens,
                output_tokens=args.output_tokens, api_key=args.api_key, timeout=args.timeout)
    if args.engine:
        from jaxllm.loader import load_model

        weights = tuple(check_format(w.strip()) for w in args.weights.split(","))
        models = {w: load_model(args.model, w) for w in weights}
        figures = {"steps": bench.engine_steps(models, slots=args.slots),
                   "prefill_join": bench.prefill_join(next(iter(models.values())))}
        print(bench.engine_table(figures["steps"], figures["prefill_join"]))
        if args.json:
            _write_json(args.json, figures)
        return 0
    if args.side_by_side:
        weights = tuple(check_format(w.strip()) for w in args.weights.split(","))
        servers, skipped = bench.serving_servers(tuple(n.strip() for n in args.side_by_side.split(",")), args.model,
                                                 weights, args.slots, args.output_tokens, args.llama_cpp_python)
        figures = bench.compare(servers, **load)
        figures["skipped"] = skipped
    else:
        figures = bench.serve(args.url, model=args.model, label=args.label, **load)
    print(bench.serve_table(figures))
    if args.json:
        _write_json(args.json, figures)
        print(f"figures written to {args.json}")
    return 0


def _write_json(path: Path, data) -> None:
    """Write to a temporary file beside `path`, then rename: an interrupted run never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


COMMANDS = {"generate": cmd_generate, "inspect": cmd_inspect, "parity": cmd_parity, "convert": cmd_convert,
            "bench": cmd_bench, "bench-serve": cmd_bench_serve, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.started = started
    from jaxllm.errors import JaxLLMError

    if not getattr(args, "no_compile_cache", True):  # generate and parity; the bench times real compiles
        from jaxllm.hub import enable_compilation_cache

        enable_compilation_cache()
    try:
        return COMMANDS[args.command](args)
    except (JaxLLMError, ImportError, OSError) as error:
        print(f"jaxllm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

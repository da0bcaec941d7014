"""Parity harness: the same checkpoint through Transformers' own model class for it (LlamaForCausalLM,
Qwen3ForCausalLM, Gemma2ForCausalLM, ...: AutoModelForCausalLM picks it from model_type; fp32, eager) and through
jaxllm.

Needs the `test` extra (torch, transformers). Every comparison covers every position and vocabulary entry.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.config import LLMConfig
from jaxllm.model import Params, forward

# One tolerance for fp32 parity on random checkpoints, one for the real model whose logits reach ~32.
TOLERANCE = 1e-4
REAL_MODEL_TOLERANCE = 2e-4


@dataclasses.dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float  # over every position and vocabulary entry
    per_position: list[float]  # max |diff| at each position (batch row 0 first, then the others)
    argmax_agreement: float  # fraction of positions whose top token agrees
    reference: np.ndarray = dataclasses.field(repr=False)  # Transformers' logits [B, T, V]
    ours: np.ndarray = dataclasses.field(repr=False)  # jaxllm's logits [B, T, V]


def torch_and_transformers():
    """(torch, transformers), or an ImportError that says which extra provides them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"the parity harness and the benchmark need the test extra: pip install 'jaxllm[test]' ({e})") from None
    return torch, transformers


def reference_model(path: str | Path, dtype: str = "float32", attention: str = "eager"):
    """Transformers' model class for the checkpoint's model_type, in eval mode, from a local HF directory (safetensors only: Transformers never
    unpickles a weights file for us) or a .gguf file (Transformers' own GGUF loader). `attention` is its
    attn_implementation: "eager" for parity, "sdpa" (its fastest CPU path) for the benchmark."""
    torch, transformers = torch_and_transformers()
    path = Path(path)
    kwargs = dict(dtype=getattr(torch, dtype), attn_implementation=attention)
    if _is_moe(path):  # Transformers 5 runs experts through grouped_mm by default; the eager loop is the reference
        kwargs["experts_implementation"] = "eager"
    if path.suffix == ".gguf":
        kwargs["gguf_file"], path = path.name, path.parent
    else:
        from jaxllm.loader import safetensors_files

        safetensors_files(path)  # a CheckpointError for a folder whose weights are only pickles
        kwargs["use_safetensors"] = True
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _is_moe(path: Path) -> bool:
    """The checkpoint's config names experts (read without validating: the reference may run what jaxllm refuses)."""
    from jaxllm.config import EXPERT_COUNT_FIELDS

    if path.suffix == ".gguf":
        from jaxllm.gguf_reader import read_gguf

        config = read_gguf(path).config
    else:
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
    return any(config.get(name) for name in EXPERT_COUNT_FIELDS)


def reference_logits(model, ids, positions, attention_mask=None) -> np.ndarray:
    """Logits [B, T, V] from a Transformers model. An explicit all-ones mask stops HF from reading jumps in
    `position_ids` as packed sequences: positions feed RoPE only, as in jaxllm."""
    torch, _ = torch_and_transformers()
    # np.array copies: torch warns on the read-only views np.asarray gives of JAX arrays.
    ids = torch.as_tensor(np.array(ids), dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.array(attention_mask))
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=torch.as_tensor(np.array(positions), dtype=torch.long),
                    attention_mask=mask, use_cache=False)
    return out.logits.double().numpy() if out.logits.dtype == torch.float64 else out.logits.float().numpy()


def jax_logits(params: Params, ids, positions, attention_mask=None, exact: bool = True) -> np.ndarray:
    """jaxllm's logits [B, T, V], by default from the exact forward (forward(..., exact=True): as close to a
    float64 run as Transformers' fp32), `exact=False` from the fast one that generation runs."""
    # `highest` makes GPU/TPU matmuls true fp32 (not TF32/bf16 passes), so the comparison holds off the CPU too.
    with jax.default_matmul_precision("highest"):
        return np.asarray(forward(params, np.asarray(ids), np.asarray(positions), attention_mask, exact=exact))


def compare_logits(reference: np.ndarray, ours: np.ndarray, attention_mask=None) -> ParityResult:
    """Max |diff| over all positions (padded positions excluded when a mask is given) and argmax agreement."""
    diff = np.abs(reference.astype(np.float64) - ours.astype(np.float64)).max(axis=-1)  # [B, T]
    agree = reference.argmax(-1) == ours.argmax(-1)  # [B, T]
    keep = np.ones(diff.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    return ParityResult(
        max_abs_diff=float(diff[keep].max()),
        per_position=[float(d) for d in diff[keep]],
        argmax_agreement=float(agree[keep].mean()),
        reference=reference,
        ours=ours,
    )


def _ids_and_positions(ids, positions) -> tuple[np.ndarray, np.ndarray]:
    """ids as [B, T]; positions as given, or 0..T-1 for every row."""
    ids = np.atleast_2d(np.asarray(ids))
    return ids, np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)) if positions is None else np.asarray(positions)


def compare(params: Params, reference, ids, positions=None, attention_mask=None) -> ParityResult:
    """Run both engines on the same ids and positions ([B, T]; positions default to 0..T-1) and compare."""
    ids, positions = _ids_and_positions(ids, positions)
    ref = reference_logits(reference, ids, positions, attention_mask)
    return compare_logits(ref, jax_logits(params, ids, positions, attention_mask), attention_mask)


def random_checkpoint(config: dict[str, Any] | str | Path, out_dir: str | Path, seed: int = 0,
                      dtype: str = "float32", max_shard_size: str | None = None, scale: float | None = None) -> Path:
    """Have Transformers build a seeded random model of the config's model_type (llama when it has none) from a
    config (dict or config.json) and save it.

    With `scale`, every weight is redrawn from N(0, scale²) and every norm weight from 1 + N(0, 0.1²), so that
    biases and norms are not left at their zero/one initial values and each tensor moves the logits.
    """
    torch, transformers = torch_and_transformers()
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    config = dict(config)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type", "llama"), **config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
    if scale is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=generator) * scale
                p.copy_(1.0 + 0.1 * noise / scale if "norm" in name else noise)
            for name, b in model.named_buffers():  # DeepSeek-V3's router bias is a buffer the choice reads
                if name.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn(b.shape, generator=generator) * scale)
    model = model.to(getattr(torch, dtype))
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def reference_greedy(model, ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """Transformers' own greedy decode (`generate(do_sample=False)`, with its KV cache): the new token ids."""
    torch, _ = torch_and_transformers()
    prompt = torch.tensor([ids])
    eos = list(eos_ids) or None
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
    return out[0, len(ids):].tolist()


def report(path: str | Path, prompt: str, max_new_tokens: int = 20, tolerance: float = REAL_MODEL_TOLERANCE,
           with_ladder: bool = False) -> dict[str, Any]:
    """Both engines on one prompt: logits at every position against Transformers fp32, the noise floor
    (Transformers fp32 vs its own float64 run), jaxllm vs float64, and the greedy continuation of each. jaxllm's
    logits come from the exact forward (forward(..., exact=True)), its greedy tokens from generate."""
    from jaxllm.generation import generate
    from jaxllm.loader import load_model

    path = Path(path)
    model = load_model(path)
    params, tokenizer = model.params, model.tokenizer
    ids = tokenizer.encode(prompt)
    positions = np.arange(len(ids))[None]
    ref32, ref64 = reference_model(path), reference_model(path, "float64")
    ours = jax_logits(params, [ids], positions)
    fp32 = reference_logits(ref32, [ids], positions)
    fp64 = reference_logits(ref64, [ids], positions)
    result = compare_logits(fp32, ours)
    ours_tokens = generate(model, ids, max_new_tokens).tokens
    ref_tokens = reference_greedy(ref32, ids, max_new_tokens, sorted(tokenizer.eos_ids))
    out = {
        "model": str(path),
        "prompt": prompt,
        "prompt_ids": ids,
        "tolerance": tolerance,
        "max_abs_diff": result.max_abs_diff,
        "noise_floor_fp32_vs_fp64": compare_logits(fp64, fp32).max_abs_diff,
        "jaxllm_vs_fp64": compare_logits(fp64, ours).max_abs_diff,
        "max_abs_logit": float(np.abs(fp64).max()),
        "argmax_agreement": result.argmax_agreement,
        "per_position_max_abs_diff": result.per_position,
        "jaxllm_greedy": {"ids": ours_tokens, "text": tokenizer.decode(ours_tokens, skip_special_tokens=True)},
        "transformers_greedy": {"ids": ref_tokens, "text": tokenizer.decode(ref_tokens, skip_special_tokens=True)},
        "greedy_agree": ours_tokens == ref_tokens,
    }
    if with_ladder:
        out["ladder"] = ladder(params, [ids], positions, reference=ref32)
    out["ok"] = bool(result.max_abs_diff <= tolerance and out["greedy_agree"]
                     and (not with_ladder or out["ladder"]["first_divergent"] is None))
    return out


# ---- quality of a weight format (weights.py) ------------------------------------------------------------------

# Prose, code, science, a story and arithmetic: the quality figures of a weight format are measured on all five.
QUALITY_PROMPTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin. Many tourists visit both cities every "
    "year because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print(fibonacci(10))",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make glucose "
    "and oxygen. It happens in",
    "Once upon a time, in a small village at the edge of a dark forest, there lived an old woodcutter and his "
    "daughter, who",
    "To solve the equation 3x + 7 = 22, first subtract 7 from both sides to get 3x = 15, then divide both sides by 3 "
    "so that x =",
)


def logit_quality(reference: np.ndarray, ours: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """How far logits [B, T, V] in some format are from reference logits, over the real positions of `mask`:
    max |diff|, KL(reference ‖ ours) of the softmaxes (mean and max over positions), and top-1 agreement."""
    keep = np.asarray(mask).astype(bool)
    ref, out = reference.astype(np.float64)[keep], ours.astype(np.float64)[keep]  # [positions, V]

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(ref), log_softmax(out)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"max_abs_diff": float(np.abs(ref - out).max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).mean()), "positions": int(keep.sum())}


def agreement_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def weights_report(model: str | Path | None, weights: str, prompts=QUALITY_PROMPTS, new_tokens: int = 64,
                   reference_path: str | Path | None = None) -> dict[str, Any]:
    """A weight format against fp32: the logits of `prompts` (one left-padded batch) from jaxllm in `weights`, from
    jaxllm in fp32 on the same checkpoint, and from Transformers in fp32 (and in bf16 when weights is "bf16"),
    compared by logit_quality; then each prompt's greedy continuation of `new_tokens` (EOS off) in the format, in
    fp32 jaxllm and in Transformers, and how long they agree. `model` as for jaxllm.load (for "gguf", the .gguf;
    the default model's when None); Transformers reads `reference_path` (default: the checkpoint itself; for the
    default model the folder converted from its GGUF, which holds the same numbers)."""
    from jaxllm.generation import generate, left_pad, positions_from_mask
    from jaxllm.loader import load_model, resolve

    quantized = load_model(model, weights)
    fp32 = load_model(model, "fp32") if weights != "fp32" else quantized
    if reference_path is None:
        reference_path = resolve(model)  # a directory, or the .gguf Transformers reads with its own loader
    rows = [fp32.tokenizer.encode(p) for p in prompts]
    ids, mask = left_pad(rows, max(map(len, rows)), 0)
    positions = np.asarray(positions_from_mask(mask))
    # Both through the programs generation runs: a format's figures are those of its own kernels.
    logits = {"jaxllm fp32": jax_logits(fp32.params, ids, positions, mask, exact=False),
              f"jaxllm {weights}": jax_logits(quantized.params, ids, positions, mask, exact=False)}
    references = {"transformers fp32": reference_model(reference_path)}
    if weights == "bf16":
        references["transformers bf16"] = reference_model(reference_path, "bfloat16")
    for name, ref in references.items():
        logits[name] = reference_logits(ref, ids, positions, mask)
    ours = logits[f"jaxllm {weights}"]
    against = {name: logit_quality(value, ours, mask) for name, value in logits.items() if name != f"jaxllm {weights}"}
    greedy = []
    for prompt, row in zip(prompts, rows):
        a = generate(quantized, row, new_tokens, eos_ids=[]).tokens
        b = generate(fp32, row, new_tokens, eos_ids=[]).tokens
        c = reference_greedy(references["transformers fp32"], row, new_tokens, [])
        greedy.append({"prompt": prompt[:40], "vs_jaxllm_fp32": agreement_length(a, b),
                       "vs_transformers_fp32": agreement_length(a, c), "fp32_vs_transformers": agreement_length(b, c)})
    return {"model": str(resolve(model, weights == "gguf")), "reference": str(reference_path), "weights": weights,
            "prompts": len(prompts), "positions": int(np.asarray(mask).sum()), "new_tokens": new_tokens,
            "against": against, "greedy": greedy}


def weights_summary(report: dict[str, Any]) -> str:
    lines = [f"model      {report['model']} as {report['weights']}; Transformers on {report['reference']}",
             f"logits     {report['prompts']} prompts, {report['positions']} positions; KL(reference ‖ "
             f"{report['weights']}) per position", ""]
    header = f"{'against':<20} {'max_abs_diff':>12} {'KL mean':>10} {'KL max':>10} {'top-1':>8}"
    lines += [header, "-" * len(header)]
    for name, q in report["against"].items():
        lines.append(f"{name:<20} {q['max_abs_diff']:>12.4g} {q['kl_mean']:>10.3g} {q['kl_max']:>10.3g} "
                     f"{q['top1_agreement']:>8.1%}")
    n = report["new_tokens"]
    lines += ["", f"greedy agreement over {n} tokens (leading tokens equal)",
              f"{'prompt':<42} {'vs jaxllm fp32':>14} {'vs HF fp32':>10} {'fp32 vs HF':>10}"]
    for g in report["greedy"]:
        lines.append(f"{g['prompt']!r:<42} {g['vs_jaxllm_fp32']:>14} {g['vs_transformers_fp32']:>10} "
                     f"{g['fp32_vs_transformers']:>10}")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"model            {report['model']}",
        f"prompt           {report['prompt']!r} ({len(report['prompt_ids'])} tokens)",
        f"max_abs_diff     {report['max_abs_diff']:.3g}  (tolerance {report['tolerance']:g}; logits reach "
        f"{report['max_abs_logit']:.1f})",
        f"noise floor      {report['noise_floor_fp32_vs_fp64']:.3g}  (Transformers fp32 vs float64)",
        f"jaxllm vs fp64   {report['jaxllm_vs_fp64']:.3g}  (the exact forward)",
        f"argmax agreement {report['argmax_agreement']:.3f}",
        f"jaxllm greedy    {report['jaxllm_greedy']['text']!r}",
        f"HF greedy        {report['transformers_greedy']['text']!r}",
        f"greedy agree     {report['greedy_agree']}",
    ]
    if "ladder" in report:
        lines.append(format_ladder(report["ladder"]))
    lines.append("PASS" if report["ok"] else "FAIL")
    return "\n".join(lines)


# ---- the diff ladder: every intermediate of both engines, in forward order ------------------------------------

# A rung diverges when max|diff| exceeds this fraction of the reference's largest magnitude there: fp32 rounding
# accumulated over 30 layers stays near 1e-6 of it, a real bug moves it by percent.
LADDER_RELATIVE_TOLERANCE = 1e-4


def layer_rungs(config: LLMConfig, i: int = 0) -> list[str]:
    """Layer i's rungs in forward order: jaxllm's tap names (model/), captured on the Transformers side by hooks
    on the modules of the same names. The family's own components appear where its forward runs them: an experts
    layer's MLP is its router logits, the chosen experts and their weights, the routed experts' sum and the shared
    expert (before its gate)."""
    attention = ["input_layernorm", "q_proj", "k_proj", "v_proj", *(["q_norm", "k_norm"] if config.qk_norm else []),
                 "q_rope", "k_rope", "attn", "o_proj"]
    if config.kv_lora_rank:  # latent attention (model/latent.py): the query, the normed latent, the heads' output
        attention = ["input_layernorm", "q", "kv_latent", "attn", "o_proj"]
    mlp = ["gate_proj", "up_proj", "mlp"]
    if config.is_moe(i):
        mlp = ["router_logits", "chosen_experts", "routing_weights", "experts",
               *(["shared_expert"] if config.shared_expert_intermediate_size else []), "mlp"]
    if config.gemma_norms:
        return [*attention, "post_attention_layernorm", "attn_residual", "pre_feedforward_layernorm", *mlp,
                "post_feedforward_layernorm", "block"]
    return [*attention, "attn_residual", "post_attention_layernorm", *mlp, "block"]


def rung_names(config: LLMConfig) -> list[str]:
    """Every rung of the ladder, in forward order; `lm_head` (the logits before soft-capping) only for Gemma 2."""
    return ["embed", *(f"layers.{i}.{r}" for i in range(config.num_hidden_layers) for r in layer_rungs(config, i)),
            "norm", *(["lm_head"] if config.final_logit_softcapping is not None else []), "logits"]


def reference_intermediates(model, ids, positions) -> dict[str, np.ndarray]:
    """Transformers' intermediates under jaxllm's names and layouts ([B, T, heads, H] for per-head tensors),
    captured with forward hooks. Fused modules (Phi-3's qkv_proj, gate_up_proj) are split as the model splits them.
    RoPE, which is no module, is applied with the model's own apply_rotary_pos_emb to the tables its rotary_emb made
    (Gemma 3 makes one pair per layer type)."""
    torch, _ = torch_and_transformers()
    config = model.config
    rotate = getattr(sys.modules[type(model.model.layers[0].self_attn).__module__], "apply_rotary_pos_emb", None)
    H = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    N, K = config.num_attention_heads, config.num_key_value_heads
    acts: dict[str, Any] = {}
    tables: dict[str | None, tuple] = {}

    B, T = np.shape(ids)

    def save(name, heads=False, use_input=False, split=None, transpose=False, tokens=False):
        def hook(module, args, output):
            value = args[0] if use_input else output
            value = value[0] if isinstance(value, tuple) else value
            value = value.transpose(1, 2) if transpose else value
            value = value.reshape(B, T, -1) if tokens else value  # an experts module's [B·T, ...] rows
            if split is not None:  # a fused module: (names, sizes along the last axis)
                for part_name, part in zip(split[0], value.split(split[1], dim=-1)):
                    acts[part_name] = part.reshape(*part.shape[:2], -1, H) if heads else part
            else:
                acts[name] = value.reshape(*value.shape[:2], -1, H) if heads and value.dim() == 3 else value
        return hook

    def save_router(p):
        def hook(module, args, output):  # HF's routers return (router logits, top-k weights, top-k indices)
            for name, value in zip(("router_logits", "routing_weights", "chosen_experts"), output):
                acts[p + name] = value.reshape(B, T, -1)
        return hook

    def save_rope(module, args, kwargs, cos_sin):
        layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
        tables[layer_type] = cos_sin

    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(save("embed")), inner.norm.register_forward_hook(save("norm")),
             inner.rotary_emb.register_forward_hook(save_rope, with_kwargs=True)]
    if getattr(config, "final_logit_softcapping", None) is not None:
        hooks.append(model.lm_head.register_forward_hook(save("lm_head")))
    for i, layer in enumerate(inner.layers):
        # Granite's MLP is block_sparse_moe
        p, attn, mlp = f"layers.{i}.", layer.self_attn, getattr(layer, "mlp", None) or layer.block_sparse_moe
        if hasattr(attn, "kv_a_layernorm"):  # latent attention: q from q_proj or q_b_proj, heads split below
            hooks += [(attn.q_proj or attn.q_b_proj).register_forward_hook(save(p + "q")),
                      attn.kv_a_layernorm.register_forward_hook(save(p + "kv_latent"))]
        elif hasattr(attn, "qkv_proj"):
            names = (p + "q_proj", p + "k_proj", p + "v_proj")
            hooks.append(attn.qkv_proj.register_forward_hook(save(None, True, split=(names, [N * H, K * H, K * H]))))
        else:
            hooks += [getattr(attn, n).register_forward_hook(save(p + n, heads=True)) for n in ("q_proj", "k_proj", "v_proj")]
        moe = getattr(layer, "block_sparse_moe", None) or mlp
        if hasattr(moe, "experts"):  # an experts layer: (router logits, weights, chosen) from the router
            router = getattr(moe, "gate", None) or moe.router
            hooks += [router.register_forward_hook(save_router(p)),
                      moe.experts.register_forward_hook(save(p + "experts", tokens=True))]
            shared = getattr(moe, "shared_expert", None) or getattr(moe, "shared_experts", None)
            if shared is not None:
                hooks.append(shared.register_forward_hook(save(p + "shared_expert", tokens=True)))
        elif hasattr(mlp, "gate_up_proj"):
            half = mlp.gate_up_proj.out_features // 2
            hooks.append(mlp.gate_up_proj.register_forward_hook(save(None, split=((p + "gate_proj", p + "up_proj"), [half, half]))))
        else:
            hooks += [getattr(mlp, n).register_forward_hook(save(p + n)) for n in ("gate_proj", "up_proj")]
        for n in ("q_norm", "k_norm") if hasattr(attn, "q_norm") else ():
            # Qwen3 norms [B, T, heads, H]; Gemma 3 norms after moving the heads forward, [B, heads, T, H].
            hooks.append(getattr(attn, n).register_forward_hook(  # OLMoE's norm the whole [B, T, N·H]
                save(p + n, heads=True, transpose=config.model_type == "gemma3_text")))
        # The MLP's input norm: Gemma's pre_feedforward_layernorm, Llama's post_attention_layernorm.
        mlp_norm = getattr(layer, "pre_feedforward_layernorm", None)
        if mlp_norm is not None:
            hooks += [layer.post_attention_layernorm.register_forward_hook(save(p + "post_attention_layernorm")),
                      mlp_norm.register_forward_hook(save(p + "pre_feedforward_layernorm")),
                      layer.post_feedforward_layernorm.register_forward_hook(save(p + "post_feedforward_layernorm"))]
        else:
            mlp_norm = layer.post_attention_layernorm
            hooks.append(mlp_norm.register_forward_hook(save(p + "post_attention_layernorm")))
        hooks += [
            layer.input_layernorm.register_forward_hook(save(p + "input_layernorm")),
            attn.o_proj.register_forward_hook(save(p + "attn", heads=True, use_input=True)),
            attn.o_proj.register_forward_hook(save(p + "o_proj")),
            mlp_norm.register_forward_hook(save(p + "attn_residual", use_input=True)),
            mlp.register_forward_hook(save(p + "mlp")),
            layer.register_forward_hook(save(p + "block")),
        ]
    try:
        acts["logits"] = torch.as_tensor(reference_logits(model, ids, positions))
    finally:
        for h in hooks:
            h.remove()
    if getattr(config, "embedding_multiplier", 1.0) != 1.0:  # Granite scales after its embed_tokens, jaxllm within
        acts["embed"] = acts["embed"] * config.embedding_multiplier
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}."
        if hasattr(layer.self_attn, "kv_a_layernorm"):  # per-head tensors of latent attention: [B, T, N, dims]
            acts[p + "q"], acts[p + "attn"] = (acts[p + n].reshape(B, T, N, -1) for n in ("q", "attn"))
            continue
        q, k = (acts.get(p + n + "_norm", acts[p + n + "_proj"]).transpose(1, 2) for n in ("q", "k"))  # [B, heads, T, H]
        if getattr(layer.self_attn, "use_rope", True):  # SmolLM3's no-RoPE layers leave q and k as they are
            layer_types = getattr(config, "layer_types", None)
            cos, sin = tables[layer_types[i] if None not in tables else None]
            q, k = rotate(q, k, cos, sin)
        acts[p + "q_rope"], acts[p + "k_rope"] = q.transpose(1, 2), k.transpose(1, 2)
    return {name: value.detach().double().numpy() for name, value in acts.items()}


def _experts_in_order(acts: dict[str, Any]) -> dict[str, Any]:
    """Each token's chosen experts (and their weights alike) in ascending expert order: a token's choices are a set,
    and DeepSeek's group-limited routers take their top k unsorted (HF's topk(sorted=False))."""
    for name in [n for n in acts if n.endswith("chosen_experts")]:
        chosen = np.asarray(acts[name])
        order = np.argsort(chosen, axis=-1, kind="stable")
        acts[name] = np.take_along_axis(chosen, order, -1)
        weights = name[:-len("chosen_experts")] + "routing_weights"
        if weights in acts:
            acts[weights] = np.take_along_axis(np.asarray(acts[weights]), order, -1)
    return acts


def ladder(model, ids, positions=None, reference=None, tolerance: float = LADDER_RELATIVE_TOLERANCE) -> dict[str, Any]:
    """Compare every intermediate, in forward order, and name the first component that diverges (or None).

    `model`: a checkpoint directory (then `reference` defaults to Transformers on the same directory) or Params.
    Returns {"rungs": [{name, max_abs_diff, rel_diff, ok}, ...], "first_divergent": name | None, "tolerance": ...}.
    """
    from jaxllm.loader import load
    from jaxllm.model import forward_with_intermediates

    if not isinstance(model, Params):
        reference = reference if reference is not None else reference_model(model)
        model = load(model)
    elif reference is None:
        raise ValueError("ladder(params, ...) needs `reference`: a Transformers model or a checkpoint directory")
    elif not hasattr(reference, "model"):
        reference = reference_model(reference)
    ids, positions = _ids_and_positions(ids, positions)
    ref = reference_intermediates(reference, ids, positions)
    with jax.default_matmul_precision("highest"):
        _, ours = forward_with_intermediates(model, ids, positions, exact=True)
    ours, ref = _experts_in_order(dict(ours)), _experts_in_order(ref)
    rungs = []
    for name in rung_names(model.config):
        a, b = np.asarray(ours[name], np.float64), ref[name]
        if a.shape != b.shape:
            raise ValueError(f"ladder rung {name}: jaxllm shape {a.shape} vs Transformers {b.shape}")
        diff = float(np.abs(a - b).max())
        rel = diff / max(float(np.abs(b).max()), 1e-30)
        rungs.append({"name": name, "max_abs_diff": diff, "rel_diff": rel, "ok": bool(rel <= tolerance)})
    first = next((r["name"] for r in rungs if not r["ok"]), None)
    return {"rungs": rungs, "first_divergent": first, "tolerance": tolerance}


def format_ladder(result: dict[str, Any]) -> str:
    lines = [f"{'rung':<36} {'max_abs_diff':>12} {'rel_diff':>10}", "-" * 60]
    for r in result["rungs"]:
        flag = "" if r["ok"] else "   <-- exceeds tolerance"
        lines.append(f"{r['name']:<36} {r['max_abs_diff']:>12.3e} {r['rel_diff']:>10.2e}{flag}")
    first = result["first_divergent"]
    lines.append(f"first divergent component: {first or 'none'} (relative tolerance {result['tolerance']:g})")
    return "\n".join(lines)

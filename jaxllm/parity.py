"""Parity harness: the same checkpoint through Transformers' LlamaForCausalLM (fp32, eager) and through jaxllm.

Needs the `test` extra (torch, transformers). Every comparison covers every position and vocabulary entry.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

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
    """Transformers' LlamaForCausalLM, in eval mode, from a local HF directory (safetensors only: Transformers never
    unpickles a weights file for us) or a .gguf file (Transformers' own GGUF loader). `attention` is its
    attn_implementation: "eager" for parity, "sdpa" (its fastest CPU path) for the benchmark."""
    torch, transformers = torch_and_transformers()
    path = Path(path)
    kwargs = dict(dtype=getattr(torch, dtype), attn_implementation=attention)
    if path.suffix == ".gguf":
        kwargs["gguf_file"], path = path.name, path.parent
    else:
        from jaxllm.loader import safetensors_files

        safetensors_files(path)  # a CheckpointError for a folder whose weights are only pickles
        kwargs["use_safetensors"] = True
    return transformers.LlamaForCausalLM.from_pretrained(str(path), **kwargs).eval()


def reference_logits(model, ids, positions, attention_mask=None) -> np.ndarray:
    """Logits [B, T, V] from a Transformers model. An explicit all-ones mask stops HF from reading jumps in
    `position_ids` as packed sequences: positions feed RoPE only, as in jaxllm."""
    torch, _ = torch_and_transformers()
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=torch.as_tensor(np.asarray(positions), dtype=torch.long),
                    attention_mask=mask, use_cache=False)
    return out.logits.double().numpy() if out.logits.dtype == torch.float64 else out.logits.float().numpy()


def jax_logits(params: Params, ids, positions, attention_mask=None) -> np.ndarray:
    # `highest` makes GPU/TPU matmuls true fp32 (not TF32/bf16 passes), so the comparison holds off the CPU too.
    with jax.default_matmul_precision("highest"):
        return np.asarray(forward(params, np.asarray(ids), np.asarray(positions), attention_mask))


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
    """Have Transformers build a seeded random LlamaForCausalLM from a config (dict or config.json) and save it.

    With `scale`, every weight is redrawn from N(0, scale²) and every norm weight from 1 + N(0, 0.1²), so that
    biases and norms are not left at their zero/one initial values and each tensor moves the logits.
    """
    torch, transformers = torch_and_transformers()
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    hf_config = transformers.LlamaConfig(**config)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    if scale is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=generator) * scale
                p.copy_(1.0 + 0.1 * noise / scale if "norm" in name else noise)
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
    (Transformers fp32 vs its own float64 run), jaxllm vs float64, and the greedy continuation of each."""
    from jaxllm.generate import generate
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


def summary(report: dict[str, Any]) -> str:
    lines = [
        f"model            {report['model']}",
        f"prompt           {report['prompt']!r} ({len(report['prompt_ids'])} tokens)",
        f"max_abs_diff     {report['max_abs_diff']:.3g}  (tolerance {report['tolerance']:g}; logits reach "
        f"{report['max_abs_logit']:.1f})",
        f"noise floor      {report['noise_floor_fp32_vs_fp64']:.3g}  (Transformers fp32 vs float64)",
        f"jaxllm vs fp64   {report['jaxllm_vs_fp64']:.3g}",
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

# Per layer, in forward order; names are jaxllm's taps (model.py), captured on the Transformers side by hooks.
LAYER_RUNGS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope", "attn", "o_proj", "attn_residual",
               "post_attention_layernorm", "gate_proj", "up_proj", "mlp", "block")
# A rung diverges when max|diff| exceeds this fraction of the reference's largest magnitude there: fp32 rounding
# accumulated over 30 layers stays near 1e-6 of it, a real bug moves it by percent.
LADDER_RELATIVE_TOLERANCE = 1e-4


def rung_names(num_layers: int) -> list[str]:
    return ["embed", *(f"layers.{i}.{r}" for i in range(num_layers) for r in LAYER_RUNGS), "norm", "logits"]


def reference_intermediates(model, ids, positions) -> dict[str, np.ndarray]:
    """Transformers' intermediates under jaxllm's names and layouts ([B, T, heads, H] for per-head tensors),
    captured with forward hooks; RoPE, which is no module, is applied with Transformers' own apply_rotary_pos_emb."""
    torch, _ = torch_and_transformers()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    H = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads
    acts: dict[str, Any] = {}

    def save(name, heads=False, use_input=False):
        def hook(module, args, output):
            value = args[0] if use_input else output
            value = value[0] if isinstance(value, tuple) else value
            acts[name] = value.reshape(*value.shape[:2], -1, H) if heads else value
        return hook

    inner = model.model
    hooks = [inner.embed_tokens.register_forward_hook(save("embed")), inner.norm.register_forward_hook(save("norm")),
             inner.rotary_emb.register_forward_hook(lambda module, args, cos_sin: acts.__setitem__("rope", cos_sin))]
    for i, layer in enumerate(inner.layers):
        p, attn, mlp = f"layers.{i}.", layer.self_attn, layer.mlp
        hooks += [
            layer.input_layernorm.register_forward_hook(save(p + "input_layernorm")),
            attn.q_proj.register_forward_hook(save(p + "q_proj", heads=True)),
            attn.k_proj.register_forward_hook(save(p + "k_proj", heads=True)),
            attn.v_proj.register_forward_hook(save(p + "v_proj", heads=True)),
            attn.o_proj.register_forward_hook(save(p + "attn", heads=True, use_input=True)),
            attn.o_proj.register_forward_hook(save(p + "o_proj")),
            layer.post_attention_layernorm.register_forward_hook(save(p + "attn_residual", use_input=True)),
            layer.post_attention_layernorm.register_forward_hook(save(p + "post_attention_layernorm")),
            mlp.gate_proj.register_forward_hook(save(p + "gate_proj")),
            mlp.up_proj.register_forward_hook(save(p + "up_proj")),
            mlp.register_forward_hook(save(p + "mlp")),
            layer.register_forward_hook(save(p + "block")),
        ]
    try:
        acts["logits"] = torch.as_tensor(reference_logits(model, ids, positions))
    finally:
        for h in hooks:
            h.remove()
    cos, sin = acts.pop("rope")
    for i in range(len(inner.layers)):
        q, k = (acts[f"layers.{i}.{n}"].transpose(1, 2) for n in ("q_proj", "k_proj"))  # HF rotates [B, heads, T, H]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        acts[f"layers.{i}.q_rope"], acts[f"layers.{i}.k_rope"] = q.transpose(1, 2), k.transpose(1, 2)
    return {name: value.detach().double().numpy() for name, value in acts.items()}


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
        _, ours = forward_with_intermediates(model, ids, positions)
    rungs = []
    for name in rung_names(model.config.num_hidden_layers):
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

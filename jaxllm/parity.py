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

# One tolerance for fp32 parity on random checkpoints (issue #2), one for the real model whose logits reach ~32.
TOLERANCE = 1e-4
REAL_MODEL_TOLERANCE = 2e-4


@dataclasses.dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float  # over every position and vocabulary entry
    per_position: list[float]  # max |diff| at each position (batch row 0 first, then the others)
    argmax_agreement: float  # fraction of positions whose top token agrees
    reference: np.ndarray = dataclasses.field(repr=False)  # Transformers' logits [B, T, V]
    ours: np.ndarray = dataclasses.field(repr=False)  # jaxllm's logits [B, T, V]

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.max_abs_diff <= tolerance


def _torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError(f"the parity harness needs the test extra: pip install 'jaxllm[test]' ({e})") from None
    return torch, transformers


def reference_model(path: str | Path, dtype: str = "float32"):
    """Transformers' LlamaForCausalLM from a local HF directory, with eager attention, in eval mode."""
    torch, transformers = _torch()
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), attn_implementation="eager"
    )
    return model.eval()


def reference_logits(model, ids, positions, attention_mask=None) -> np.ndarray:
    """Logits [B, T, V] from a Transformers model. An explicit all-ones mask stops HF from reading jumps in
    `position_ids` as packed sequences: positions feed RoPE only, as in jaxllm."""
    torch, _ = _torch()
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


def compare(params: Params, reference, ids, positions=None, attention_mask=None) -> ParityResult:
    """Run both engines on the same ids and positions ([B, T]; positions default to 0..T-1) and compare."""
    ids = np.atleast_2d(np.asarray(ids))
    positions = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)) if positions is None else np.asarray(positions)
    ref = reference_logits(reference, ids, positions, attention_mask)
    return compare_logits(ref, jax_logits(params, ids, positions, attention_mask), attention_mask)


def random_checkpoint(config: dict[str, Any] | str | Path, out_dir: str | Path, seed: int = 0,
                      dtype: str = "float32", max_shard_size: str | None = None, scale: float | None = None) -> Path:
    """Have Transformers build a seeded random LlamaForCausalLM from a config (dict or config.json) and save it.

    With `scale`, every weight is redrawn from N(0, scale²) and every norm weight from 1 + N(0, 0.1²), so that
    biases and norms are not left at their zero/one initial values and each tensor moves the logits.
    """
    torch, transformers = _torch()
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
    torch, _ = _torch()
    prompt = torch.tensor([ids])
    eos = list(eos_ids) or None
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
    return out[0, len(ids):].tolist()


def report(path: str | Path, prompt: str, max_new_tokens: int = 20, tolerance: float = REAL_MODEL_TOLERANCE,
           ladder: bool = False) -> dict[str, Any]:
    """Both engines on one prompt: logits at every position against Transformers fp32, the noise floor
    (Transformers fp32 vs its own float64 run), jaxllm vs float64, and the greedy continuation of each."""
    from jaxllm.generate import Model, generate
    from jaxllm.loader import load
    from jaxllm.tokenizer import Tokenizer

    path = Path(path)
    tokenizer = Tokenizer.from_dir(path)
    params = load(path)
    ids = tokenizer.encode(prompt)
    positions = np.arange(len(ids))[None]
    ref32, ref64 = reference_model(path), reference_model(path, "float64")
    ours = jax_logits(params, [ids], positions)
    fp32 = reference_logits(ref32, [ids], positions)
    fp64 = reference_logits(ref64, [ids], positions)
    result = compare_logits(fp32, ours)
    ours_tokens = generate(Model(params, tokenizer), ids, max_new_tokens).tokens
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
    if ladder:
        out["ladder"] = run_ladder(params, ref32, [ids], positions)
    out["ok"] = bool(result.max_abs_diff <= tolerance and out["greedy_agree"]
                     and (not ladder or out["ladder"]["first_divergent"] is None))
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

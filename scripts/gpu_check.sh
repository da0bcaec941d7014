#!/usr/bin/env bash
# jaxllm on a GPU, two checks:
#   1. parity: the default model's logits on the GPU against the CPU, fp32 (max |diff| and argmax agreement, at
#      JAX's default matmul precision on the GPU, which may use TF32, and at "highest", held to parity's tolerance)
#   2. bench: a TinyLlama-1.1B-shaped checkpoint of random weights, jaxllm's weights in fp32, bf16 and int8 side by
#      side: decode tokens/s and the fraction of the memory-bandwidth roofline (`jaxllm bench --quick`; --full for all)
#
# Usage: scripts/gpu_check.sh [--full]
# Needs jax with CUDA and the test extra (torch and Transformers make the random checkpoint and run the bench's
# reference, on the CPU); JAXLLM_GPU_INSTALL=1 first runs: pip install -e ".[test]" "jax[cuda12]".
# The default model is fetched on first use (pip), unless it is already in ~/.cache/jaxllm.
# Exit status: 0 when both checks ran and parity holds, 1 otherwise (no GPU, parity past tolerance, an error).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=--quick
case "${1:-}" in
  "") ;;
  --full) quick= ;;
  *) echo "usage: $0 [--full]" >&2; exit 1 ;;
esac
if [[ "${JAXLLM_GPU_INSTALL:-0}" == 1 ]]; then
  pip install -e ".[test]" "jax[cuda12]"
fi
if ! python -c 'import jax; jax.devices("gpu")' >/dev/null 2>&1; then
  echo "gpu_check: JAX sees no GPU (jax.devices('gpu') fails): install jax[cuda12], or set JAXLLM_GPU_INSTALL=1" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1. parity: the default model, GPU against CPU"
python - <<'PY'
import sys

import jax
import numpy as np

import jaxllm
from jaxllm import parity

model = jaxllm.load_model(None)
ids = np.array([model.tokenizer.encode("The capital of France is")])  # [1, T]
positions = np.arange(ids.shape[1])[None]
logits = {}
for kind in ("gpu", "cpu"):
    device = jax.devices(kind)[0]
    with jax.default_device(device):  # the parameters are placed as they are read, onto this device
        params = jaxllm.load(None)
        assert params.embed_tokens.devices() == {device}, params.embed_tokens.devices()
        for precision in ("default", "highest"):
            with jax.default_matmul_precision(precision):
                logits[kind, precision] = np.asarray(jaxllm.forward(params, ids, positions))
print(f"{jax.devices('gpu')[0].device_kind} against {jax.devices('cpu')[0].device_kind}, {ids.shape[1]} positions")
for precision in ("default", "highest"):
    gpu, cpu = logits["gpu", precision], logits["cpu", precision]
    agree = float((gpu.argmax(-1) == cpu.argmax(-1)).mean())
    print(f"  matmul precision {precision:<8} max_abs_diff {np.abs(gpu - cpu).max():.3g}  argmax agreement {agree:.3f}")
diff = np.abs(logits["gpu", "highest"] - logits["cpu", "highest"]).max()
same_argmax = (logits["gpu", "highest"].argmax(-1) == logits["cpu", "highest"].argmax(-1)).all()
ok = diff <= parity.REAL_MODEL_TOLERANCE and same_argmax
print(f"  {'PASS' if ok else 'FAIL'}: at 'highest', max_abs_diff {diff:.3g} (tolerance {parity.REAL_MODEL_TOLERANCE})")
sys.exit(0 if ok else 1)
PY

echo "== 2. bench: TinyLlama-1.1B-shaped random weights, fp32, bf16 and int8"
python - "$work/tinyllama" <<'PY'
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxllm import parity

out = parity.random_checkpoint("configs/tinyllama-1.1b.json", sys.argv[1], seed=0)  # saved in float32
# The bench's prompts need a tokenizer and TinyLlama's own is not at hand: a byte-level one, ids 0-255, all inside
# the 32000-token vocabulary (generated tokens it lacks decode as U+FFFD).
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tokenizer.save(str(out / "tokenizer.json"))
PY
python -m jaxllm bench --model "$work/tinyllama" --weights fp32,bf16,int8 $quick --json "$work/bench.json"
echo "== summary"
python - "$work/bench.json" <<'PY'
import json
import sys

figures = json.load(open(sys.argv[1]))
for weights, row in figures["formats"]["formats"].items():
    print(f"{weights:<5} on {figures['environment']['jax_device']}: decode {row['decode_tokens_per_s']} tokens/s "
          f"({row['decode_vs_first']}x fp32), roofline fraction {row['roofline_fraction']} "
          f"({row['weight_bytes_per_token'] / 1e9:.2f} GB of weights a step, {row['bandwidth_gb_per_s']} GB/s measured "
          f"by the matvec)")
PY

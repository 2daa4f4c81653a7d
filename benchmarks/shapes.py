"""Model shapes the benchmarks use, and the FLOPs they count.

Model FLOPs per trained token, for LoRA on a frozen base (the MFU numerator; recomputation by
activation checkpointing is not counted, as in PaLM's definition of MFU):

    flops/token = 4 * N_frozen + 6 * N_lora + 12 * L * d * S

- N_frozen: the frozen weights that multiply activations (every linear layer of every block, plus
  the output head; the input embedding is a lookup). Forward 2N, backward 2N for the gradient with
  respect to the activations; no weight gradient, the weights are frozen.
- N_lora: the adapter weights; forward 2N, backward 4N (activations and weights).
- 12 * L * d * S: attention scores and their use (QK^T and AV), forward and backward, for sequence
  length S, as PaLM counts them (no halving for the causal mask).

MFU = tokens/s * flops/token / peak, with peak the GPU's dense bf16 figure (H100 SXM: 989 TFLOP/s).
"""
from __future__ import annotations

from stages.memory import counts, shape_from_config

SHAPES = {
    "internlm2-1_8b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                           intermediate_size=8192, vocab_size=92544, max_position_embeddings=32768),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=92544, max_position_embeddings=32768),
}

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(shape: dict, lora_r: int, seq: int) -> float:
    """Model FLOPs per trained token of a config-style shape (the formula above)."""
    s = shape_from_config(shape)
    c = counts(s, lora_r)
    head = s["vocab"] * s["hidden"]
    attention = 12 * s["layers"] * s["hidden"] * seq
    return 4 * (c["linear"] + head) + 6 * c["lora"] + attention


def peak_flops(gpu_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in gpu_name), None)


def mfu(tokens_per_s: float, shape: dict, lora_r: int, seq: int, gpu_name: str) -> float | None:
    peak = peak_flops(gpu_name)
    return None if peak is None else tokens_per_s * flops_per_token(shape, lora_r, seq) / peak

"""How much GPU memory a training setting needs, and the setting a memory budget allows.

The user states the memory of their card (`train.memory_gb`) and the batch they want
(`train.global_batch`); `plan()` picks the micro-batch, the gradient accumulation that keeps the
global batch, and whether to checkpoint activations.

The estimate is peak = weights + adapter training state + loss buffer + tokens x activations:

- 4-bit weights: 0.516 bytes a parameter (NF4 and its double-quantized scales); bf16/fp16: 2; fp32: 4.
- frozen weights that are not 4-bit (embeddings, output head): 4 bytes each with `upcast_frozen`,
  else the compute dtype's size.
- LoRA parameters, on the layers the config targets, with the structure's shapes (InternLM2's fused
  `wqkv` has one adapter where the Llama format has three): float32 weight and gradient (8 bytes)
  plus AdamW's two float32 moments (8) or 8-bit AdamW's (2); paged 8-bit AdamW's states (2) are
  held outside PyTorch's allocator and are not counted.
- loss: one chunk of float32 logits with `fused_loss` (stages/kernels.py; 1 GB, or a 32nd of a
  smaller budget); without it the whole micro-batch's logits, their float32 copy and gradient
  (12 bytes x vocabulary a token).
- activations a token, per decoder layer, without checkpointing: 24 x hidden + 11.7 x intermediate
  bytes. With checkpointing every layer keeps 2.8 x hidden bytes, and one layer is rebuilt at a
  time, which does not coincide with the loss.

The constants were fitted to the peaks PyTorch reserved on an H100 (bf16, LoRA dropout 0.1, SDPA
attention, sequence 2048) for the 1.8B and 7B shapes, within 0.5 GB: see benchmarks/README.md.
A 0.5 GB margin covers the allocator's own.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.errors import fail

GB = 1e9
MARGIN = 0.5 * GB
UNCHECKPOINTED_TOKENS = 16384  # a micro-batch this large keeps the GPU busy without recomputation
# optimizer state bytes a LoRA parameter that PyTorch's allocator holds: AdamW's two float32 moments,
# 8-bit AdamW's two bytes; the paged 8-bit states live in CUDA managed memory, outside PyTorch's count,
# and page out to host memory when the card is full
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 0}


def loss_chunk_bytes(budget_gb: float | None) -> int:
    """Logits of one loss chunk: 1 GB, less on a small card."""
    return int(min(1 << 30, budget_gb * GB / 32)) if budget_gb else 1 << 30


def shape_from_config(cfg: dict) -> dict:
    """The numbers the estimate needs, from a causal LM's config (config.json's keys)."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return {"hidden": d, "layers": cfg["num_hidden_layers"], "intermediate": cfg["intermediate_size"],
            "vocab": cfg["vocab_size"], "kv": d // heads * cfg.get("num_key_value_heads", heads),
            "arch": (cfg.get("architectures") or [None])[0]}


def shape_of(model_dir: str | Path) -> dict:
    """shape_from_config of the model directory's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        return shape_from_config(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        fail(f"{path}: missing; model.path must be a model directory with its config.json")
    except (ValueError, KeyError, TypeError) as err:
        fail(f"{path}: not a causal LM config ({type(err).__name__}: {err})")


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer of one decoder block, by module name, for the shape's structure:
    InternLM2 fuses q, k and v into `wqkv` (and names the MLP w1, w3, w2), the Llama format keeps them apart."""
    d, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    if shape.get("arch") == "InternLM2ForCausalLM":
        return {"wqkv": (d, d + 2 * kv), "wo": (d, d), "w1": (d, i), "w3": (d, i), "w2": (i, d)}
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def counts(shape: dict, lora_r: int, targets: list[str] | str = "all-linear") -> dict:
    """Parameters: the decoder blocks' linear layers, the frozen embeddings and head, and the adapters
    on the `targets` (module names as the rendered config lists them; `all-linear`: every block linear)."""
    linears = linear_shapes(shape)
    adapted = [shape_ for name, shape_ in linears.items() if targets == "all-linear" or name in targets]
    return {"linear": shape["layers"] * sum(a * b for a, b in linears.values()),
            "frozen": 2 * shape["vocab"] * shape["hidden"],
            "lora": shape["layers"] * lora_r * sum(a + b for a, b in adapted)}


def estimate(shape: dict, *, tokens: int, checkpointing: bool, quant: str, compute_bytes: int, lora_r: int,
             optimizer: str, upcast_frozen: bool, fused_loss: bool, loss_chunk: int = int(GB),
             targets: list[str] | str = "all-linear") -> float:
    """Peak GPU bytes of one training process (what PyTorch reserves)."""
    n = counts(shape, lora_r, targets)
    weights = n["linear"] * (0.516 if quant != "none" else compute_bytes)
    frozen = n["frozen"] * (4 if upcast_frozen and quant != "none" else compute_bytes)
    lora = n["lora"] * (8 + OPTIMIZER_STATE_BYTES[optimizer])
    loss = loss_chunk if fused_loss else tokens * shape["vocab"] * 12
    layer = tokens * (24 * shape["hidden"] + 11.7 * shape["intermediate"])
    if checkpointing:
        activations = tokens * shape["layers"] * 2.8 * shape["hidden"] + max(layer, loss)
    else:
        activations = shape["layers"] * layer + loss
    return weights + frozen + lora + activations + MARGIN


def divisors(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def plan(shape: dict, *, budget_gb: float | None, seq: int, global_batch: int, gpus: int,
         micro_batch: int | str, checkpointing: bool | str, **setting) -> dict:
    """Micro-batch, accumulation and checkpointing for a budget. Fixed choices are kept; `auto`
    ones are chosen: without checkpointing when a micro-batch of 16k tokens (or the whole per-GPU
    batch) fits, else with it, at the largest micro-batch that fits."""
    per_gpu = global_batch // gpus

    def fits(mb: int, ckpt: bool) -> bool:
        return budget_gb is None or estimate(shape, tokens=mb * seq, checkpointing=ckpt, **setting) <= budget_gb * GB

    sizes = [micro_batch] if micro_batch != "auto" else divisors(per_gpu)
    ckpts = [checkpointing] if checkpointing != "auto" else ([False, True] if budget_gb else [False])
    chosen = None
    for ckpt in ckpts:
        fitting = [mb for mb in sizes if fits(mb, ckpt)]
        if not fitting:
            continue
        mb = fitting[0]
        wanted = min(per_gpu, max(1, UNCHECKPOINTED_TOKENS // seq))
        if ckpt is False and checkpointing == "auto" and mb < wanted:
            continue  # too small a micro-batch to keep the GPU busy: checkpointing buys a larger one
        chosen = (mb, ckpt)
        break
    if chosen is None:  # nothing fits: the smallest setting, and say so
        chosen = (sizes[-1], ckpts[-1])
    mb, ckpt = chosen
    peak = None if budget_gb is None else estimate(shape, tokens=mb * seq, checkpointing=ckpt, **setting)
    return {"micro_batch": mb, "grad_accum": per_gpu // mb, "checkpointing": ckpt,
            "estimate_gb": None if peak is None else round(peak / GB, 1)}  # no budget (CPU): no estimate

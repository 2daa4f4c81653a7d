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
- activations a token, per decoder layer, without checkpointing: 6 x hidden + 8.7 x intermediate
  bytes, plus with LoRA dropout 3 bytes (the dropped-out copy and its mask) for each input width of
  an adapted layer (Llama's q, k, v, o, gate, up: 6 x hidden, and down: intermediate; InternLM2's
  fused wqkv, wo, w1, w3: 4 x hidden, and w2). A checkpointed layer keeps 2.8 x hidden bytes, and is rebuilt in the backward pass, one
  at a time, which does not coincide with the loss (24 x hidden + 11.7 x intermediate bytes a token
  when every layer is checkpointed, with or without dropout). Checkpointing may cover some of the layers
  (the first ones: the backward pass reaches them after the others have freed their activations).
  With `offload` (train.offload_activations) a checkpointed layer's input, 2 x hidden bytes a token, is
  in host memory: 0.8 x hidden bytes stay (not yet fitted to a measured peak). With `tile_mlp` (LoRA without
  dropout, on a GPU) the rebuilt layer's MLP runs in slices of tokens (`mlp_tiles`), and the rebuilt layer's
  intermediate-wide part is divided by their number.
- with `fp8` (train.fp8) and its weights kept: 1 byte a frozen linear parameter of every layer not
  checkpointed. torch.compile finds the forward's dequantisation again in the backward pass and keeps the
  backward's float8 copy of the weights from the forward (1.36 GB more at the peak for the 1.8B shape, 1.51
  GB counted); where that does not fit, the backward dequantises again and nothing is kept (`plan`).

The constants were fitted to the peaks PyTorch reserved on an H100 (bf16, LoRA dropout 0.1, SDPA
attention, sequence 2048) for the 1.8B and 7B shapes, within 0.5 GB, and to the train stage's peaks
on an H200 with LoRA dropout 0 (InternLM2 structure): see benchmarks/README.md.
A 0.5 GB margin covers the allocator's own.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.errors import fail

GB = 1e9
MARGIN = 0.5 * GB
BUSY_TOKENS = 8192  # a micro-batch this large keeps an H200 busy (benchmarks/README.md, "Speed")
TILE_BYTES = 256 << 20  # one of the MLP's widest activations in a slice of tokens (`mlp_tiles`)
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
             targets: list[str] | str = "all-linear", checkpointed: int | None = None,
             dropout: float = 0.1, offload: bool = False, fp8: bool = False, tile_mlp: bool = False) -> float:
    """Peak GPU bytes of one training process (what PyTorch reserves). `checkpointed`: how many
    decoder layers are checkpointed (default: all of them with `checkpointing`, else none). `tile_mlp`: the
    checkpointed layers' MLPs rebuilt in slices of tokens (`mlp_tiles`)."""
    n = counts(shape, lora_r, targets)
    weights = n["linear"] * (0.516 if quant != "none" else compute_bytes)
    frozen = n["frozen"] * (4 if upcast_frozen and quant != "none" else compute_bytes)
    lora = n["lora"] * (8 + OPTIMIZER_STATE_BYTES[optimizer])
    loss = loss_chunk if fused_loss else tokens * shape["vocab"] * 12
    dropped = sum(a for name, (a, _) in linear_shapes(shape).items() if targets == "all-linear" or name in targets)
    layer = tokens * (6 * shape["hidden"] + 8.7 * shape["intermediate"] + (3 * dropped if dropout else 0))
    k = checkpointed if checkpointed is not None else (shape["layers"] if checkpointing else 0)
    kept = tokens * k * (0.8 if offload else 2.8) * shape["hidden"] + (shape["layers"] - k) * layer
    if fp8 and quant != "none":  # each kept layer's float8 weights, saved by torch.compile for the backward pass
        kept += n["linear"] * (shape["layers"] - k) / shape["layers"]
    tiles = mlp_tiles(tokens, shape["intermediate"]) if tile_mlp and k else 1
    # fitted; the same with dropout 0; the intermediate-wide part in slices with `tile_mlp`
    rebuilt = tokens * (24 * shape["hidden"] + 11.7 * shape["intermediate"] / tiles)
    activations = kept + (max(rebuilt, loss) if k == shape["layers"] else loss)
    return weights + frozen + lora + activations + MARGIN


def mlp_tiles(tokens: int, intermediate: int, dtype_bytes: int = 2) -> int:
    """Slices of a micro-batch's tokens in which a checkpointed layer's MLP is rebuilt (stages/kernels.py
    `tile_mlp`): each slice's activations of the intermediate width at most TILE_BYTES (16,384 tokens of the
    1.8B shape's 8,192 wide, 9,362 of the 7B's 14,336). Four slices at the 1.8B shape's micro-batch 16 took 1 GB
    more off the peak than two, and 7% of the speed (benchmarks/README.md)."""
    return max(1, -(-tokens * intermediate * dtype_bytes // TILE_BYTES))


def divisors(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def plan(shape: dict, *, budget_gb: float | None, seq: int, global_batch: int, gpus: int,
         micro_batch: int | str, checkpointing: bool | str, **setting) -> dict:
    """Micro-batch, accumulation and activation checkpointing for a budget. Fixed choices are kept.
    With `auto` checkpointing and a budget: among micro-batches of at least BUSY_TOKENS (or the whole
    per-GPU batch), the fewest checkpointed layers that fit (each costs its forward pass again, a
    third of its compute), then the largest micro-batch; when none fits so, every layer checkpointed
    at the largest micro-batch that fits. Without a budget (CPU): no checkpointing. With `fp8` the choice is
    made without its kept float8 weights, which are then kept if they fit (`fp8_keep`), else the backward
    dequantises again: a second dequantisation costs less than a checkpointed layer or a smaller micro-batch."""
    fp8 = setting.pop("fp8", False)
    per_gpu = global_batch // gpus
    layers = shape.get("layers", 0) if shape else 0

    def fits(mb: int, k: int) -> bool:
        return budget_gb is None or estimate(shape, tokens=mb * seq, checkpointing=k > 0, checkpointed=k,
                                             **setting) <= budget_gb * GB

    sizes = [micro_batch] if micro_batch != "auto" else divisors(per_gpu)
    if checkpointing == "auto" and budget_gb and layers:
        busy = min(per_gpu, max(1, BUSY_TOKENS // seq))
        options = [(next((k for k in range(layers + 1) if fits(mb, k)), None), mb)
                   for mb in sizes if mb >= busy or micro_batch != "auto"]
        options = sorted((k, -mb) for k, mb in options if k is not None)
        if options:
            k, mb = options[0][0], -options[0][1]
        else:
            k = layers
            mb = next((mb for mb in sizes if fits(mb, k)), sizes[-1])
    else:
        k = layers if (checkpointing is True or checkpointing == "auto" and budget_gb) else 0
        mb = next((mb for mb in sizes if fits(mb, k)), sizes[-1])  # nothing fits: the smallest, and say so
    peak = None if budget_gb is None else estimate(shape, tokens=mb * seq, checkpointing=k > 0, checkpointed=k,
                                                   **setting)
    keep = False
    if fp8:
        kept = None if peak is None else estimate(shape, tokens=mb * seq, checkpointing=k > 0, checkpointed=k,
                                                  fp8=True, **setting)
        keep = kept is None or kept <= budget_gb * GB
        peak = kept if keep else peak
    tiles = mlp_tiles(mb * seq, shape["intermediate"]) if k and setting.get("tile_mlp") else 0
    tiles = tiles if tiles > 1 else 0
    return {"micro_batch": mb, "grad_accum": per_gpu // mb, "checkpointing": k > 0 or checkpointing is True,
            "fp8_keep": keep,
            # every layer too when offloaded: stages/kernels.py checkpoint_first offloads, the model's own does not;
            # and with MLPs in slices, which need to know a layer's second forward pass from its first
            "checkpoint_layers": k if 0 < k < layers or (k and (setting.get("offload") or tiles)) else None,
            "tile_mlp": tiles,
            "estimate_gb": None if peak is None else round(peak / GB, 1)}  # no budget (CPU): no estimate

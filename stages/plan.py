"""Planning and writing an XTuner config, shared by the render stage and the recipes' own phases.

`resolve` makes every `auto` in params concrete for a machine (device, precision, DeepSpeed stage,
compute dtype, and from the GPU's memory the micro-batch, accumulation and activation checkpointing:
stages/memory.py); `render_text` fills a recipe's Jinja2 template; `write_config` writes it (with the
DeepSpeed JSON beside it when one is used) and loads it back with mmengine as a check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages import memory
from stages import params as P
from stages.errors import fail
from stages.io import output_dir, write_json
from stages.modeldir import cpu_threads, read_config
from stages.paths import INTERNVL_MODEL, llm_dir
from stages.structures import lora_targets

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def machine() -> dict:
    """What `auto` is resolved against: is a CUDA GPU visible, does it have bf16, its memory."""
    import torch

    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_properties(0).total_memory / memory.GB if cuda else None
    return {"cuda": cuda, "bf16": cuda and torch.cuda.is_bf16_supported(), "card_gb": card}


def resolve(p: P.Params, cuda: bool, bf16: bool, card_gb: float | None = None,
            shape: dict | None = None) -> dict:
    """Every `auto` in params made concrete for a machine; pure, so it is tested for both kinds."""
    t = p.train
    device = t.device if t.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        fail("train.device: cuda, but no CUDA GPU is visible here (set train.device: auto or cpu)")
    precision = t.precision if t.precision != "auto" else (
        ("bf16" if bf16 else "fp16") if device == "cuda" else "fp32")
    if precision == "bf16" and device == "cuda" and not bf16:
        fail("train.precision: bf16, but this GPU has no bf16 (use fp16 or auto)")
    world = t.gpus * t.nodes  # training processes over all nodes
    deepspeed = t.deepspeed if t.deepspeed != "auto" else (
        "zero2" if device == "cuda" and world > 1 else "none")  # CPU processes: plain DDP over gloo
    if t.optimizer != "adamw" and device == "cpu":
        fail(f"train.optimizer: {t.optimizer} needs a GPU, and this run trains on the CPU; use adamw")
    compute = p.quant.compute_dtype if p.quant.compute_dtype != "auto" else DTYPES[precision]
    budget = None
    if device == "cuda":
        budget = t.memory_gb if t.memory_gb != "auto" else round(0.9 * (card_gb or 80), 1)
    chunk = memory.loss_chunk_bytes(budget)
    targets = lora_targets({"architectures": [(shape or {}).get("arch")]}, p.lora.target_modules)
    compile_layers = t.compile_layers if t.compile_layers != "auto" else (
        device == "cuda" and deepspeed == "none" and world == 1)
    fp8 = bool(t.fp8) and _fp8_lacks(p, device, precision, compile_layers) is None
    batch = memory.plan(
        shape or {}, budget_gb=budget, seq=p.data.max_length, global_batch=t.global_batch, gpus=world,
        micro_batch=t.micro_batch, checkpointing=t.activation_checkpointing,  # no budget (CPU): all, none
        quant=p.quant.mode, compute_bytes=2 if compute != "float32" else 4, lora_r=p.lora.r,
        optimizer=t.optimizer, upcast_frozen=p.quant.upcast_frozen, fused_loss=t.fused_loss, loss_chunk=chunk,
        targets=targets, dropout=p.lora.dropout, offload=device == "cuda" and t.offload_activations, fp8=fp8,
        # a checkpointed layer's MLP rebuilt in slices of tokens (stages/kernels.py tile_mlp): LoRA without dropout
        tile_mlp=device == "cuda" and not p.lora.dropout)
    return {"device": device, "precision": precision, "deepspeed": deepspeed, "gpus": t.gpus, "nodes": t.nodes,
            "torch_dtype": DTYPES[precision], "compute_dtype": compute, "memory_gb": budget,
            "micro_batch": batch["micro_batch"], "grad_accum": batch["grad_accum"],
            "checkpointing": batch["checkpointing"], "checkpoint_layers": batch["checkpoint_layers"],
            "offload_activations": bool(device == "cuda" and t.offload_activations and batch["checkpoint_layers"]),
            "tile_mlp": batch["tile_mlp"],
            "estimate_gb": batch["estimate_gb"],
            "fused_loss": t.fused_loss, "loss_chunk_mb": chunk // 2**20,
            "compile_layers": compile_layers,
            "compile_loss": bool(compile_layers and t.fused_loss),  # the fused loss's chunk math (stages/kernels.py)
            "gqa": device == "cuda",  # InternLM2's attention without K and V copied to every head (stages/kernels.py)
            "rope_table": device == "cuda",  # InternLM2's cos and sin read from a table, not computed a layer
            "cuda_graphs": bool(compile_layers and device == "cuda" and t.cuda_graphs and world == 1
                                and not batch["checkpointing"] and not batch["checkpoint_layers"]),
            # no wait for the GPU at an iteration's end (stages/overlap.py): with train.cuda_graphs, on one GPU
            # process without DeepSpeed, checkpointed layers or not
            "overlap": bool(device == "cuda" and t.cuda_graphs and world == 1 and deepspeed == "none"),
            "tune_kernels": bool(compile_layers and device == "cuda" and t.tune_kernels),
            "fp8": fp8, "fp8_keep": bool(fp8 and batch["fp8_keep"]),
            # the float8 products with fast accumulation, forward and backward (stages/fp8.py): with train.fp8,
            # +5.3% on one H200 at the same products' errors and loss (benchmarks/README.md)
            "fp8_fast_accum": fp8, "fp8_fast_accum_grad": fp8,
            "upcast_frozen": p.quant.upcast_frozen or p.quant.mode == "none",
            "lora_targets": targets, "max_length": p.data.max_length,
            "cpu_threads": cpu_threads(device, (shape or {}).get("hidden"))}


def checkpointing_words(resolved: dict) -> str:
    """`True`, `False`, or `True (the first 8 layers)` when the planner checkpoints some layers only."""
    k = resolved.get("checkpoint_layers")
    return f"{resolved.get('checkpointing')}" + (f" (the first {k} layers)" if k else "")


def _fp8_lacks(p: P.Params, device: str, precision: str, compile_layers: bool) -> str | None:
    """What `train.fp8` needs that this run lacks (None: nothing). The float8 products pay only inside compiled
    layers (eager, each scaling is a kernel of its own: slower than bf16). An older GPU is refused outright
    (stages/kernels.py), not turned off."""
    if device != "cuda":
        return "it needs a CUDA GPU of compute capability 8.9 or above (Ada, Hopper); here the CPU trains"
    if precision != "bf16":
        return f"it needs bf16 training (this GPU trains in {precision})"
    if p.quant.mode == "none":
        return "it runs the frozen 4-bit weights' products (quant.mode: none)"
    if not compile_layers:
        return "it needs compiled layers (train.compile_layers; off with DeepSpeed or several GPUs)"
    return None


def fp8_off(p: P.Params, resolved: dict) -> str | None:
    """Why `train.fp8`, asked for, is off in `resolved` (None: on, or not asked for)."""
    if not p.train.fp8 or resolved["fp8"]:
        return None
    return _fp8_lacks(p, resolved["device"], resolved["precision"], resolved["compile_layers"])


def resolve_here(p: P.Params, machine_facts: dict | None = None) -> dict:
    """resolve for this machine (or the one described), with the shape of the model at model.path;
    the image recipes' batch settings applied. What every stage that renders a config uses."""
    if p.recipe == "internvl":  # LoRA goes on the InternVL model's own LLM (its shape is the planner's)
        llm = read_config(INTERNVL_MODEL, str(INTERNVL_MODEL)).get("llm_config", {})
        llm = llm if isinstance(llm, dict) else {}
        resolved = resolve(p, **(machine_facts or machine()), shape=memory.shape_from_config(llm) if llm else None)
        resolved["lora_targets"] = lora_targets(llm, "all-linear")
    else:
        resolved = resolve(p, **(machine_facts or machine()), shape=memory.shape_of(str(llm_dir(p.recipe))))
    return llava_batch(p, resolved) if p.recipe in ("llava", "internvl") else resolved


def run_settings(resolved: dict, max_iters: int | None) -> dict:
    """What every recipe's template takes alike from the resolved settings: the optimizer wrapper
    (mmengine's AMP one unless fp32; loss scaling for fp16 only: mmengine's wrapper scales dynamically
    unless told otherwise, and for bf16, whose range is fp32's, that buys a scale, an unscale, an
    overflow check and a host-device sync a step for nothing; fused AdamW on one CUDA GPU without
    DeepSpeed: one kernel for the whole update), the log interval (every step on a
    CPU, else 10, or fewer when the run is shorter), the distributed backend, and on several CPU
    processes mmengine's DDP wrapper without a device (its default pins the model to GPU LOCAL_RANK:
    `ValueError: DistributedDataParallel device_ids and output_device arguments only work with
    single-device/multiple-device GPU modules`)."""
    amp = resolved["precision"] != "fp32"
    return {"optim_wrapper": "AmpOptimWrapper" if amp else "OptimWrapper",
            "amp_dtype": DTYPES[resolved["precision"]] if amp else None,
            "loss_scale": "dynamic" if resolved["precision"] == "fp16" else {"enabled": False} if amp else None,
            "fused_optimizer": resolved["device"] == "cuda" and resolved["deepspeed"] == "none",
            "log_interval": 1 if resolved["device"] == "cpu" else min(10, max_iters or 10),
            "dist_backend": "nccl" if resolved["device"] == "cuda" else "gloo",
            # pinned batches, no waits at an iteration's end (stages/overlap.py), where `resolve` says
            "overlap": bool(resolved.get("overlap")),
            "cpu_ddp": resolved["device"] == "cpu" and resolved["gpus"] * resolved.get("nodes", 1) > 1}


def llava_batch(p: P.Params, resolved: dict) -> dict:
    """The llava recipe's micro-batch (train.micro_batch when a number, else 1) and the accumulation that
    makes up train.global_batch; no activation checkpointing, no fused loss, no compiled layers (the
    kernels module serves the text recipe's model class)."""
    t = p.train
    micro = t.micro_batch if isinstance(t.micro_batch, int) else 1
    accum = max(1, t.global_batch // (micro * t.gpus * t.nodes))
    return {**resolved, "micro_batch": micro, "grad_accum": accum, "checkpointing": False, "checkpoint_layers": None,
            "estimate_gb": None,
            "fused_loss": False, "compile_layers": False, "compile_loss": False, "gqa": False, "rope_table": False,
            "cuda_graphs": False, "overlap": False, "tune_kernels": False, "offload_activations": False,
            "tile_mlp": 0,
            "fp8": False, "fp8_keep": False, "fp8_fast_accum": False, "fp8_fast_accum_grad": False}


def render_text(template: Path, ctx: dict) -> str:
    """The Jinja2 `template` (a recipe's template.py.j2) filled with `ctx`; every variable required."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(template).parent), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["py"] = repr
    return env.get_template(Path(template).name).render(**ctx)


def deepspeed_config(resolved: dict) -> dict:
    """The ZeRO JSON, with precision explicit (XTuner's `auto` would decide from the GPU alone)."""
    stage = int(resolved["deepspeed"][-1])
    return {
        "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": stage, "overlap_comm": True},
        "fp16": {"enabled": resolved["precision"] == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": resolved["precision"] == "bf16"},
    }


def check_config(path: Path) -> Any:
    """Load the rendered file the way XTuner will (mmengine, lazy imports)."""
    from stages.xtuner_api import load_config

    return load_config(path)


def write_config(text: str, resolved: dict, out: Path) -> Path:
    """`out`/xtuner_config.py (+ deepspeed.json), whole or not at all, loaded back as a check."""
    with output_dir(out) as tmp:
        (tmp / "xtuner_config.py").write_text(text, encoding="utf-8")
        if resolved["deepspeed"] != "none":
            write_json(tmp / "deepspeed.json", deepspeed_config(resolved))
        check_config(tmp / "xtuner_config.py")
    return out / "xtuner_config.py"

"""The params.yaml contract: typed sections, a JSON Schema derived from them, one-line errors.

The dataclasses below are the single source of truth. `schema()` turns them into a JSON Schema
(unknown keys, types, ranges), `load()` validates params.yaml against it with jsonschema, then checks
what a schema cannot say (settings that contradict each other), and returns frozen dataclasses.

    python -m stages.params              # validate params.yaml, print it resolved
    python -m stages.params --schema     # print the JSON Schema (for editors and CI)
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, Union

from stages.errors import fail
from stages.paths import PARAMS


def spec(doc: str, **rules: Any) -> Any:
    """A required field: `doc` documents it, `rules` are JSON Schema keywords (minimum, ...)."""
    return field(metadata={"doc": doc, **rules})


@dataclass(frozen=True)
class TinyModel:
    """The stand-in of the recipes' LLM (internlm2-chat-1_8b): a causal LM built locally (stage stand_in),
    InternLM2's structure (XTuner's shipped remote code) by default."""

    architecture: Literal["internlm2", "llama"] = spec(
        "internlm2: InternLM2ForCausalLM through trust_remote_code, as internlm2-chat-1_8b; llama: transformers' "
        "LlamaForCausalLM (the Llama-format case)")
    vocab_size: int = spec("SentencePiece BPE vocabulary (byte fallback), special tokens included; at least the "
                           "project text's characters and 265 (bytes, special tokens)", minimum=320, maximum=65536)
    hidden_size: int = spec("model width", minimum=8)
    num_layers: int = spec("decoder layers", minimum=1)
    num_heads: int = spec("attention heads; must divide hidden_size", minimum=1)
    num_kv_heads: int = spec("key/value heads (grouped-query attention); must divide num_heads", minimum=1)
    intermediate_size: int = spec("MLP width", minimum=8)
    max_position_embeddings: int = spec("longest sequence the model accepts", minimum=64)
    seed: int = spec("seed of the weight initialisation and pretraining", minimum=0)
    pretrain_steps: int = spec("steps of pretraining on data/raw/assistant/general_chat.jsonl (0: random weights)",
                               minimum=0)


@dataclass(frozen=True)
class Llava:
    source: str = spec("LLaVA-format unique_data.json", minLength=1)
    image_folder: str = spec("folder the records' `image` paths are relative to", minLength=1)
    repeat: int = spec("how many times the records are repeated (the tutorial's -n)", minimum=1)


@dataclass(frozen=True)
class AssistantData:
    templates: str = spec("question and answer templates of the self-cognition data (JSON)", minLength=1)
    general_chat: str = spec("general conversations mixed in (JSON Lines, OpenAI messages format)", minLength=1)
    name: str = spec("the assistant's name, as the fine-tuned model should say it", minLength=1)
    author: str = spec("who made the assistant", minLength=1)
    repeat: int = spec("samples per identity question template", minimum=1)
    general_ratio: float = spec("share of general conversations mixed in (0 = none)",
                                minimum=0, exclusiveMaximum=1)
    seed: int = spec("seed of sampling and shuffling", minimum=0)


@dataclass(frozen=True)
class Data:
    max_length: int = spec("tokens per training sequence", minimum=32)
    overlong: Literal["error", "drop", "truncate"] = spec(
        "records longer than max_length: error lists them, drop leaves them out, truncate lets XTuner cut them")
    assistant: AssistantData = spec("the self-cognition data: templates, names, the general share")
    llava: Llava = spec("the LLaVA sample and its repetition")
    internvl: Llava = spec("the InternVL (CLoT-style) sample and its repetition")


@dataclass(frozen=True)
class Lora:
    r: Union[Literal["auto"], int] = spec(
        "LoRA rank; auto: the recipe's preset (assistant and llava 64; internvl 128, the tutorial's)", minimum=1)
    alpha: Union[Literal["auto"], float] = spec(
        "LoRA alpha (scaling = alpha / r); auto: the recipe's preset (64; internvl 256)", exclusiveMinimum=0)
    dropout: Union[Literal["auto"], float] = spec(
        "LoRA dropout; auto: the recipe's preset (0.1; internvl 0.05)", minimum=0, exclusiveMaximum=1)
    target_modules: Union[Literal["all-linear"], list[str]] = spec(
        "modules that get adapters: all-linear, or a list of module names", minItems=1)


@dataclass(frozen=True)
class Quant:
    mode: Literal["nf4", "fp4", "none"] = spec("4-bit quantization of the frozen base (QLoRA), or none")
    double_quant: bool = spec("quantize the quantization constants too")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = spec(
        "dtype of 4-bit matmuls; auto: bfloat16 where the GPU has it, else float16, float32 on CPU")
    upcast_frozen: bool = spec(
        "keep the frozen weights that are not 4-bit (embeddings, output head, norms) in float32, as "
        "peft's prepare_model_for_kbit_training does; false keeps them in the compute dtype (half the memory)")


@dataclass(frozen=True)
class Train:
    device: Literal["auto", "cpu", "cuda"] = spec("where to train; auto: cuda when a GPU is visible")
    gpus: int = spec("training processes on each node (torchrun --nproc-per-node; more than one runs torchrun): "
                     "GPUs on a GPU host, CPU processes (gloo) when training on the CPU", minimum=1)
    nodes: int = spec("machines the run spans (torchrun --nnodes); each runs the train stage, node 0 writes the "
                      "outputs; the project (models/work/ too) must be on a filesystem they share", minimum=1)
    node_rank: Union[Literal["auto"], int] = spec(
        "this machine's index among the nodes, 0 to nodes - 1; auto: $SLURM_NODEID, else $NODE_RANK, else 0",
        minimum=0)
    master_addr: str = spec("address of node 0, where the nodes meet (torchrun --master-addr); auto: 127.0.0.1 on "
                            "one node, $MASTER_ADDR on several", minLength=1)
    master_port: Union[Literal["auto"], int] = spec(
        "TCP port on node 0 the nodes meet at (torchrun --master-port); auto: a free port on one node; on several "
        "$MASTER_PORT, else 29500", minimum=1, maximum=65535)
    deepspeed: Literal["auto", "none", "zero1", "zero2", "zero3"] = spec(
        "DeepSpeed ZeRO stage; auto: zero2 on several GPUs, none on one GPU (nothing to shard) or CPU")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = spec(
        "mixed precision; auto: bf16 where the GPU has it, fp32 on CPU")
    prompt_template: str = spec("XTuner prompt template name", minLength=1)
    pack: bool = spec("pack samples to max_length")
    global_batch: int = spec("sequences per optimizer step over all processes (micro_batch x accumulation x gpus x "
                             "nodes; the accumulation is derived)", minimum=1)
    micro_batch: Union[Literal["auto"], int] = spec(
        "sequences per GPU per forward pass; auto: the largest that fits memory_gb (stages/memory.py)", minimum=1)
    memory_gb: Union[Literal["auto"], float] = spec(
        "GPU memory the run may use, per GPU, in GB; auto: 90% of the card's", exclusiveMinimum=0)
    activation_checkpointing: Union[Literal["auto"], bool] = spec(
        "recompute activations in the backward pass (far less memory, a third more compute); auto: in as "
        "few decoder layers as memory_gb allows at a micro-batch of at least 8k tokens (stages/memory.py)")
    fused_loss: bool = spec("compute the loss in chunks, never the whole vocabulary's logits (stages/kernels.py)")
    compile_layers: Union[Literal["auto"], bool] = spec(
        "torch.compile each decoder layer for training (fuses norms, RoPE, SwiGLU and LoRA's element-wise "
        "work), and the fused loss's softmax; the first steps spend about a minute compiling; auto: on one CUDA "
        "GPU without DeepSpeed")
    cuda_graphs: bool = spec(
        "the host ahead of the GPU: each compiled decoder layer's forward and backward replayed as CUDA graphs "
        "(torch.compile's reduce-overhead mode; stages/kernels.py) and no wait for the GPU at an iteration's "
        "end (stages/overlap.py); the graphs apply with compiled layers on one GPU when no layer is checkpointed, "
        "the no-wait part on one GPU without DeepSpeed, checkpointed layers or not. At the "
        "1.8B shape on one H200: 0.165 s an iteration against 0.192 s, a 160-iteration run with 8 checkpoints and "
        "chats trained in 80.8 s against 93.4 s; the first run on a machine compiles about 30 s longer "
        "(benchmarks/README.md)")
    tune_kernels: bool = spec(
        "tune the compiled layers' Triton kernels on this machine: inductor's multi-kernel row reductions (a "
        "variant that reads each row once, kept where it is faster: the float8 scaling's row maxima) and "
        "coordinate-descent tuning of each kernel's launch settings; applies with compiled layers on a GPU; "
        "every run tunes anew, in a cache of its own (about 3 minutes more compiling at the 1.8B shape). One "
        "H200, 1.8B shape, micro-batch 16, every layer checkpointed and offloaded, train.fp8: 48,609 to 50,060 "
        "tokens/s, 3%; the default at 24 GB with it 55,230 (benchmarks/README.md)")
    offload_activations: bool = spec(
        "each checkpointed decoder layer's input kept in pinned host memory until the backward pass (as "
        "Unsloth does): 2 bytes x hidden a token a layer off the GPU, for a copy each way; every layer is then "
        "checkpointed by the pipeline (stages/kernels.py); GPU only; at the 1.8B shape, micro-batch 16, 11.25 to "
        "8.54 GB for 8% of the speed on one H200 (benchmarks/README.md)")
    fp8: bool = spec(
        "the frozen 4-bit weights' matrix products (forward, and the backward's input gradient) in float8 "
        "e4m3 with per-row power-of-two scales (torch._scaled_mm; stages/fp8.py): about twice bf16's rate "
        "on the GPU's matrix units, rounding the products' operands to e4m3 (a product 3.8% off float32's "
        "where bf16's is 0.23%; the LoRA weights, norms, attention and loss stay in bf16); applies on a CUDA GPU of "
        "compute capability 8.9 or above (Ada, Hopper) with 4-bit quant, bf16 and compiled layers (on an older GPU the "
        "train stage stops and says so); elsewhere off (uncompiled, each scaling is a kernel of its own and the "
        "products are slower than bf16's). One H200, 1.8B shape: 56,293 tokens/s against 49,243, losses within "
        "0.1%, 1.4 GB more: each layer's float8 weight kept for its backward pass, where memory_gb allows "
        "(benchmarks/README.md)")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = spec(
        "AdamW, or bitsandbytes' 8-bit AdamW (optimizer states in 8 bits; paged: spill to CPU memory under "
        "pressure); the 8-bit ones need a GPU and no DeepSpeed")
    epochs: int = spec("passes over the data", minimum=1)
    max_iters: Union[Literal["auto"], int, None] = spec(
        "stop after this many iterations (null: run the epochs); auto: the recipe's preset (assistant null; "
        "llava 320; internvl 400)", minimum=1)
    lr: Union[Literal["auto"], float] = spec(
        "peak learning rate; auto: the recipe's preset for its tiny stand-ins (assistant and llava 4e-3, internvl "
        "1e-3; 2e-4 suits InternLM2-chat-1.8B, the tutorial's InternVL2-2B run 1e-6)", exclusiveMinimum=0)
    betas: list[float] = spec("AdamW betas", minItems=2, maxItems=2, items_range=(0, 1))
    weight_decay: float = spec("AdamW weight decay", minimum=0)
    max_norm: float = spec("gradient clipping norm", exclusiveMinimum=0)
    warmup_iters: Union[Literal["auto"], int] = spec(
        "linear warm-up iterations (XTuner's 0.03 ratio is 0 on short runs; at 1, mmengine's LinearLR never leaves "
        "its start factor); auto: the recipe's preset (5)", minimum=2)
    save_interval: int = spec("iterations between checkpoints", minimum=1)
    save_total_limit: int = spec("checkpoints kept", minimum=1)
    seed: int = spec("training seed", minimum=0)


@dataclass(frozen=True)
class AssistantRecipe:
    """recipe: assistant, the self-cognition text QLoRA: what it asks, and its merge."""

    prompts: list[str] = spec("prompts the model answers during and after training", minItems=1)
    heldout_prompts: str = spec("JSON with identity_heldout (paraphrases not in the training data) and "
                                "general prompts", minLength=1)
    perplexity_data: str = spec("held-out general conversations (JSON Lines) for perplexity", minLength=1)
    merge_dtype: Literal["auto", "bfloat16", "float16", "float32"] = spec(
        "dtype of the merged model; auto: the training precision (float32 on CPU)")
    merge_tolerance: float = spec("largest allowed |logit| difference between base+adapter and the merged "
                                  "model (computed in float32)", exclusiveMinimum=0)


@dataclass(frozen=True)
class Eval:
    system: str = spec("system prompt ('' for none)")
    interval: int = spec("iterations between evaluation chats during training", minimum=1)
    max_new_tokens: int = spec("tokens generated per answer", minimum=1)
    backend: Literal["auto", "transformers", "lmdeploy"] = spec(
        "generation backend of the evaluate stage; auto: lmdeploy where a GPU is visible and "
        "$LMDEPLOY_PYTHON names an interpreter with lmdeploy, else transformers")
    seed: int = spec("seed of generation", minimum=0)


@dataclass(frozen=True)
class Select:
    rule: Literal["best", "last"] = spec(
        "which checkpoint convert, merge and evaluate use (stage select): best: the highest held-out identity "
        "hit rate among the checkpoints within max_leak and max_perplexity_rise (the assistant recipe; the image "
        "recipes keep their last); last: the final one")
    max_leak: float = spec("best: the largest share of general answers that may name the identity", minimum=0,
                           maximum=1)
    max_perplexity_rise: float = spec(
        "best: how far perplexity on held-out general conversations may rise above the base model's, as a "
        "fraction of it (0.2: 20%)", minimum=0)
    during_training: Union[Literal["auto"], bool] = spec(
        "score the checkpoints as they are saved (three at a time), in a process the train stage starts beside "
        "the trainer (the select stage then reads the scores back instead of loading the model again); auto: "
        "on one CUDA GPU, when the GPU has room for the base model beside the training")


@dataclass(frozen=True)
class TinyVision:
    """The llava recipe's embedded vision encoder: a CLIP vision model built locally (stage stand_in, recipe llava)."""

    image_size: int = spec("input image side in pixels (336 for CLIP ViT-L/14-336)", minimum=14)
    patch_size: int = spec("patch side in pixels; (image_size / patch_size)^2 image tokens reach the LLM",
                           minimum=1)
    hidden_size: int = spec("encoder width", minimum=8)
    num_layers: int = spec("encoder layers (XTuner reads hidden_states[-2]: at least 2)", minimum=2)
    num_heads: int = spec("attention heads; must divide hidden_size", minimum=1)
    intermediate_size: int = spec("MLP width", minimum=8)
    seed: int = spec("seed of the weight initialisation", minimum=0)


@dataclass(frozen=True)
class LlavaPhase:
    lr: float = spec("peak learning rate", exclusiveMinimum=0)
    max_iters: int = spec("training iterations", minimum=1)
    warmup_iters: int = spec("linear warm-up iterations (at 1, mmengine's LinearLR never leaves its start "
                             "factor)", minimum=2)


@dataclass(frozen=True)
class VisualLora:
    r: int = spec("LoRA rank of the vision encoder's adapter", minimum=1)
    alpha: float = spec("LoRA alpha (scaling = alpha / r)", exclusiveMinimum=0)
    dropout: float = spec("LoRA dropout", minimum=0, exclusiveMaximum=1)


@dataclass(frozen=True)
class LlavaRecipe:
    """recipe: llava, XTuner's llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune:
    QLoRA on the LLM (models/llava/llm; lora, quant), LoRA on a CLIP vision encoder (models/llava/vision), a
    projector between them."""

    pretrained_pth: Union[str, None] = spec(
        "pretrain checkpoint holding the projector, inside models/llava/ (a .pth file or DeepSpeed folder, e.g. the tutorial's "
        "iter_2181.pth); checked against the two models before fine-tuning. null: the train stage first trains "
        "the projector itself (LLM and vision encoder frozen; llava.pretrain)", minLength=1)
    pretrain: LlavaPhase = spec("the projector's pretraining (only when pretrained_pth is null); the fine-tune's "
                                "schedule is `train`'s")
    visual_lora: VisualLora = spec("LoRA adapter of the vision encoder (the LLM's is `lora`)")
    eval_images: list[str] = spec("images (relative to data.llava.image_folder) asked about by the "
                                  "evaluate stage, before and after fine-tuning", minItems=1)
    eval_prompt: Union[str, None] = spec(
        "question asked about each eval image (null: the image's first question in data.llava.source)",
        minLength=1)
    merge_tolerance: float = spec(
        "largest allowed |logit| difference between base+adapters (float32) and the merged model; XTuner's "
        "merge saves the LLM in float16, so this is looser than assistant.merge_tolerance", exclusiveMinimum=0)


@dataclass(frozen=True)
class TinyInternVL:
    """The internvl recipe's stand-in: a CLIP vision model, mlp1 and the LLM stand-in (stand_in.tiny.llm)
    as its LLM, with InternVL's interface (stage stand_in)."""

    image_size: int = spec("tile side in pixels (force_image_size; 448 for InternVL2-2B)", minimum=14)
    patch_size: int = spec("patch side in pixels", minimum=1)
    hidden_size: int = spec("vision encoder width", minimum=8)
    num_layers: int = spec("vision encoder layers", minimum=1)
    num_heads: int = spec("attention heads; must divide hidden_size", minimum=1)
    intermediate_size: int = spec("vision MLP width", minimum=8)
    downsample_ratio: float = spec("pixel shuffle: (image_size / patch_size)^2 x ratio^2 image tokens per tile "
                                   "(0.5 as InternVL2)", exclusiveMinimum=0, maximum=1)
    max_dynamic_patch: int = spec("most tiles an image is cut into (a thumbnail is added when more than one)",
                                  minimum=1)
    seed: int = spec("seed of the weight initialisation", minimum=0)


@dataclass(frozen=True)
class InternVLRecipe:
    """recipe: internvl, XTuner's internvl_v2_internlm2_2b_qlora_finetune as the tutorial runs it: QLoRA on
    the LLM (4-bit when quant.mode is not none), frozen vision encoder, mlp1 trained; the model (its remote code
    included) in models/internvl/model."""

    eval_images: list[str] = spec("images (relative to data.internvl.image_folder) asked about before and after "
                                  "fine-tuning", minItems=1)
    eval_prompt: str = spec("the question asked about each eval image", minLength=1)
    merge_tolerance: float = spec(
        "largest allowed |logit| difference between the trained model (float32) and the converted one; "
        "convert_to_official saves bfloat16, so this is loose", exclusiveMinimum=0)


@dataclass(frozen=True)
class NoStandIn:
    """A recipe that reads the LLM stand-in alone."""


@dataclass(frozen=True)
class StandIns:
    """Tiny stand-ins with the real models' structures, built by the stage stand_in@tiny into the selected
    recipe's model folder, models/<recipe>/ (only the selected recipe's are built)."""

    llm: TinyModel = spec("llm: internlm2-chat-1_8b's stand-in, every recipe's LLM (internvl: inside its model)")
    assistant: NoStandIn = spec("the assistant recipe reads the LLM alone: {}")
    llava: TinyVision = spec("vision: the llava recipe's CLIP vision encoder (ViT-L/14-336)")
    internvl: TinyInternVL = spec("model: InternVL2-2B's stand-in around the LLM's, its vision part here")


STAND_IN_KEY = "tiny"  # the one key of `stand_in`: its stage is stand_in@tiny


@dataclass(frozen=True)
class Params:
    recipe: Literal["assistant", "llava", "internvl"] = spec(
        "which fine-tune to run: assistant (self-cognition text QLoRA), llava (image chat, LLaVA) or internvl "
        "(InternVL2 image chat QLoRA)")
    stand_in: Union[StandIns, None] = spec(
        "`tiny: {...}` builds tiny stand-ins of the selected recipe's models (a run without the real ones); "
        "`{}` on a real-model run: nothing is built, your models are linked into models/<recipe>/ "
        "(python -m stages.link)", keyed=STAND_IN_KEY)
    data: Data = spec("dataset generation, repetition and validation")
    lora: Lora = spec("LoRA adapter")
    quant: Quant = spec("quantization of the base model")
    train: Train = spec("training")
    eval: Eval = spec("evaluation: chats during training, and the evaluate stage")
    select: Select = spec("which of the saved checkpoints the rest of the pipeline uses")
    assistant: AssistantRecipe = spec("the assistant recipe: its prompts, held-out data and merge")
    llava: LlavaRecipe = spec("the llava recipe: vision encoder, projector, its phases")
    internvl: InternVLRecipe = spec("the internvl recipe: model directory, stand-in shape, schedule")


# What `auto` in the lora section means for each recipe: one vocabulary for the three, so that
# `dvc exp run -S lora.r=64` reaches whichever recipe is selected; internvl's is the tutorial's
# internvl_v2_internlm2_2b_qlora_finetune_e1_r128 (r 128, alpha 256, dropout 0.05).
LORA_PRESETS = {"assistant": {"r": 64, "alpha": 64, "dropout": 0.1},
                "llava": {"r": 64, "alpha": 64, "dropout": 0.1},
                "internvl": {"r": 128, "alpha": 256, "dropout": 0.05}}
# The same for the train section's schedule: `dvc exp run -S train.lr=2e-4` reaches any recipe. The
# rates are the tiny stand-ins' (a 361k-parameter model needs a high one); the image recipes count
# iterations (their data is repeated), the assistant recipe epochs.
TRAIN_PRESETS = {"assistant": {"lr": 4e-3, "max_iters": None, "warmup_iters": 5},
                 "llava": {"lr": 4e-3, "max_iters": 320, "warmup_iters": 5},
                 "internvl": {"lr": 1e-3, "max_iters": 400, "warmup_iters": 5}}


def with_presets(params: Params) -> Params:
    """`params` with every `auto` of the lora section and of the train schedule replaced by the selected
    recipe's preset."""
    def fill(section: Any, preset: dict) -> Any:
        return dataclasses.replace(section, **{k: v for k, v in preset.items() if getattr(section, k) == "auto"})

    return dataclasses.replace(params, lora=fill(params.lora, LORA_PRESETS[params.recipe]),
                               train=fill(params.train, TRAIN_PRESETS[params.recipe]))


# ---------------------------------------------------------------------------------------------
# dataclasses -> JSON Schema


def _type_schema(tp: Any, rules: dict) -> dict:
    origin = typing.get_origin(tp)
    if "keyed" in rules:  # {key: section} or {}
        (section,) = [t for t in typing.get_args(tp) if t is not type(None)]
        return {"type": "object", "properties": {rules["keyed"]: schema(section)}, "additionalProperties": False}
    if dataclasses.is_dataclass(tp):
        return schema(tp)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(t, rules) for t in typing.get_args(tp)]}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if tp is type(None):
        return {"type": "null"}
    if origin is list:
        (item,) = typing.get_args(tp)
        out = {"type": "array", "items": _type_schema(item, {})}
        for key in ("minItems", "maxItems"):
            if key in rules:
                out[key] = rules[key]
        if "items_range" in rules:
            lo, hi = rules["items_range"]
            out["items"].update(minimum=lo, exclusiveMaximum=hi)
        return out
    base = {int: "integer", float: "number", str: "string", bool: "boolean"}[tp]
    out = {"type": base}
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength"):
        if key in rules and base != "boolean":
            out[key] = rules[key]
    return out


def schema(cls: type = Params) -> dict:
    """The JSON Schema of a params dataclass: every key required, no other key allowed."""
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = _type_schema(hints[f.name], dict(f.metadata))
        prop["description"] = f.metadata["doc"]
        props[f.name] = prop
    out = {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    if cls is Params:
        out = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "params.yaml", **out}
    return out


# ---------------------------------------------------------------------------------------------
# validation


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    return repr(value)


def _key(path: Any) -> str:
    """A params path as users write it: `train.betas[1]`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Any) -> str:
    """One jsonschema error as `key: what is wrong (what is allowed)`."""
    key = _key(err.absolute_path) or "(top level)"
    kw, inst = err.validator, err.instance
    if kw == "additionalProperties":
        allowed = sorted(err.schema["properties"])
        extra = sorted(set(inst) - set(allowed))[0]
        where = f"{key}.{extra}" if err.absolute_path else extra
        close = difflib.get_close_matches(extra, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown key ({hint}allowed: {', '.join(allowed)})"
    if kw == "required":
        missing = [k for k in err.validator_value if k not in inst][0]
        where = f"{key}.{missing}" if err.absolute_path else missing
        return f"{where}: missing ({err.schema['properties'][missing]['description']})"
    if kw == "type":
        want = err.validator_value
        return f"{key}: got {_describe(inst)}, expected {'an' if want[0] in 'aeiou' else 'a'} {want}"
    if kw == "enum":
        return f"{key}: got {_describe(inst)}, allowed: {', '.join(map(str, err.validator_value))}"
    if kw == "anyOf":
        return f"{key}: got {_describe(inst)}, allowed: {_allowed_any(err.validator_value)}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kw in bounds:
        return f"{key}: got {inst!r}, must be {bounds[kw]} {err.validator_value}"
    if kw == "minLength":
        return f"{key}: must not be empty"
    if kw in ("minItems", "maxItems"):
        return f"{key}: {len(inst)} items, must have {'at least' if kw == 'minItems' else 'at most'} " \
               f"{err.validator_value}"
    return f"{key}: {err.message}"


def _allowed_any(options: list) -> str:
    parts = []
    for opt in options:
        if "enum" in opt:
            parts += map(str, opt["enum"])
        elif opt.get("type") == "array":
            parts.append(f"a list of {opt['items']['type']}s")
        else:
            bounds = [f"{op} {opt[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                      ("exclusiveMaximum", "<"), ("maximum", "<=")) if k in opt]
            parts.append(f"{opt['type']}{' ' if bounds else ''}{' and '.join(bounds)}")
    return " or ".join(parts)


def _contradictions(p: Params) -> list[str]:
    """What a schema cannot say: settings that cannot work together."""
    out = []
    if p.train.deepspeed == "zero3" and p.quant.mode != "none":
        out.append(f"train.deepspeed: zero3 cannot shard 4-bit weights (quant.mode: {p.quant.mode}); "
                   "use zero2, or quant.mode: none")
    if isinstance(p.train.node_rank, int) and p.train.node_rank >= p.train.nodes:
        out.append(f"train.node_rank: {p.train.node_rank} is not below train.nodes {p.train.nodes} (node ranks "
                   "run from 0); set node_rank, or auto to take it from $SLURM_NODEID")
    if p.train.device == "cpu" and p.train.deepspeed not in ("auto", "none"):
        out.append(f"train.deepspeed: {p.train.deepspeed} needs a GPU (train.device is cpu); use auto or none")
    if p.train.device == "cpu" and p.train.precision in ("bf16", "fp16"):
        out.append(f"train.precision: {p.train.precision} mixed precision needs a GPU (train.device is cpu); "
                   "use auto or fp32")
    tr = p.train
    world = tr.gpus * tr.nodes  # training processes in all
    if isinstance(tr.micro_batch, int) and tr.global_batch % (tr.micro_batch * world):
        out.append(f"train.global_batch: {tr.global_batch} is not a multiple of micro_batch x "
                   + (f"gpus x nodes ({tr.micro_batch} x {tr.gpus} x {tr.nodes})" if tr.nodes > 1
                      else f"gpus ({tr.micro_batch} x {tr.gpus})"))
    elif tr.global_batch % world:
        out.append(f"train.global_batch: {tr.global_batch} cannot be split over {world} processes (train.gpus "
                   f"{tr.gpus}" + (f" x train.nodes {tr.nodes})" if tr.nodes > 1 else ")"))
    if tr.optimizer != "adamw":
        if tr.deepspeed not in ("auto", "none") or (tr.deepspeed == "auto" and world > 1 and tr.device != "cpu"):
            out.append(f"train.optimizer: {tr.optimizer} is not a DeepSpeed optimizer "
                       f"(train.deepspeed: {tr.deepspeed}, {world} processes); use adamw, or deepspeed: none")
        elif tr.device == "cpu":
            out.append(f"train.optimizer: {tr.optimizer} needs a GPU (train.device is cpu); use adamw")
    ph = p.llava.pretrain
    if ph.warmup_iters >= ph.max_iters:
        out.append(f"llava.pretrain.warmup_iters: {ph.warmup_iters} is not below max_iters {ph.max_iters}")
    if tr.max_iters is None and p.recipe != "assistant":
        out.append(f"train.max_iters: null (epochs) is the assistant recipe's; the {p.recipe} recipe counts "
                   "iterations: give a number, or auto")
    elif tr.max_iters is not None and tr.warmup_iters >= tr.max_iters:
        out.append(f"train.warmup_iters: {tr.warmup_iters} is not below max_iters {tr.max_iters}")
    out += _raw_file_contradictions(p)
    out += _stand_in_contradictions(p)
    return out


def recipe_files(p: Params) -> dict[str, str]:
    """The selected recipe's data params that name files or folders: key -> path."""
    d = getattr(p.data, p.recipe)
    keys = {"assistant": ("templates", "general_chat"), "llava": ("source", "image_folder"),
            "internvl": ("source", "image_folder")}[p.recipe]
    out = {f"data.{p.recipe}.{k}": getattr(d, k) for k in keys}
    if p.recipe == "assistant":
        out.update({f"assistant.{k}": getattr(p.assistant, k) for k in ("heldout_prompts", "perplexity_data")})
    return out


def _raw_file_contradictions(p: Params) -> list[str]:
    """A recipe's files live in data/raw/<recipe>/: that folder is its stages' data dep in dvc.yaml, so
    a file elsewhere would change without rerunning what reads it."""
    from stages.paths import RAW

    from stages.paths import model_folder

    home = RAW / p.recipe
    out = [f"{key}: {path} is outside {home}/, the folder the {p.recipe} stages depend on (dvc.yaml); "
           f"put the file there" for key, path in recipe_files(p).items()
           if not Path(os.path.normpath(path)).is_relative_to(home)]
    pth = p.llava.pretrained_pth
    if p.recipe == "llava" and pth and not Path(os.path.normpath(pth)).is_relative_to(model_folder("llava")):
        out.append(f"llava.pretrained_pth: {pth} is outside {model_folder('llava')}/, the folder of the llava "
                   f"recipe's models that its stages depend on (dvc.yaml); put the checkpoint there")
    return out


def stand_ins_read(p: Params) -> list[str]:
    """The stand-ins the selected recipe reads, built by stand_in@tiny into models/<recipe>/ (llm, vision,
    model); none on a real-model run (`stand_in: {}`)."""
    from stages.paths import MODEL_ROLES

    return list(MODEL_ROLES[p.recipe]) if p.stand_in is not None else []


def _stand_in_contradictions(p: Params) -> list[str]:
    out: list[str] = []
    if p.stand_in is None:
        return out
    name = f"stand_in.{STAND_IN_KEY}"
    t = p.stand_in.llm
    if t.hidden_size % t.num_heads:
        out.append(f"{name}.llm.num_heads: {t.num_heads} does not divide hidden_size {t.hidden_size}")
    elif t.num_heads % t.num_kv_heads:
        out.append(f"{name}.llm.num_kv_heads: {t.num_kv_heads} does not divide num_heads {t.num_heads}")
    elif p.quant.mode != "none":  # bitsandbytes' CPU 4-bit kernels pack output rows in blocks of 32
        kv_dim = t.hidden_size // t.num_heads * t.num_kv_heads
        for key, value in (("hidden_size", t.hidden_size), ("intermediate_size", t.intermediate_size),
                           ("num_kv_heads x head size", kv_dim)):
            if value % 32:
                out.append(f"{name}.llm.{key}: {value} is not a multiple of 32, which 4-bit quantization "
                           f"(quant.mode: {p.quant.mode}) needs on CPU")
                break
    v = p.stand_in.llava
    if v.image_size % v.patch_size:
        out.append(f"{name}.llava.image_size: {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if v.hidden_size % v.num_heads:
        out.append(f"{name}.llava.num_heads: {v.num_heads} does not divide hidden_size {v.hidden_size}")
    if p.recipe == "llava" and \
            p.data.max_length <= (v.image_size // v.patch_size) ** 2:
        out.append(f"data.max_length: {p.data.max_length} leaves no room for text after "
                   f"{(v.image_size // v.patch_size) ** 2} image tokens")
    out += _internvl_contradictions(p)
    if p.data.max_length > t.max_position_embeddings:
        out.append(f"data.max_length: {p.data.max_length} exceeds {name}.llm.max_position_embeddings "
                   f"{t.max_position_embeddings}")
    return out


def _internvl_contradictions(p: Params) -> list[str]:
    iv, out = p.stand_in.internvl, []
    name = f"stand_in.{STAND_IN_KEY}.internvl"
    grid = iv.image_size // iv.patch_size
    side = round(1 / iv.downsample_ratio)
    if iv.image_size % iv.patch_size:
        out.append(f"{name}.image_size: {iv.image_size} is not a multiple of patch_size {iv.patch_size}")
    elif abs(side * iv.downsample_ratio - 1) > 1e-9 or grid % side:
        out.append(f"{name}.downsample_ratio: {iv.downsample_ratio} must be 1/k with k dividing the "
                   f"{grid} x {grid} patch grid")
    if iv.hidden_size % iv.num_heads:
        out.append(f"{name}.num_heads: {iv.num_heads} does not divide hidden_size {iv.hidden_size}")
    if p.recipe == "internvl" and not out:
        tokens = (grid // side) ** 2 * (iv.max_dynamic_patch + (iv.max_dynamic_patch > 1))
        if p.data.max_length <= tokens:
            out.append(f"data.max_length: {p.data.max_length} leaves no room for text after up to {tokens} image "
                       f"tokens ({name})")
    return out


def _build(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        if "keyed" in f.metadata:
            (section,) = [t for t in typing.get_args(hints[f.name]) if t is not type(None)]
            value = _build(section, value[f.metadata["keyed"]]) if value else None
        elif dataclasses.is_dataclass(hints[f.name]):
            value = _build(hints[f.name], value)
        elif isinstance(value, list):
            value = tuple(value) if f.name == "betas" else list(value)
        elif isinstance(value, float) and int in (hints[f.name], *typing.get_args(hints[f.name])):
            value = int(value)  # JSON Schema counts 12.0 as an integer; range() and torch do not
        kwargs[f.name] = value
    return cls(**kwargs)


def _numbers(node: Any, path: tuple = ()) -> Iterator[tuple[str, float]]:
    """(key, value) of every float in a parsed params mapping (YAML reads `.inf` and `.nan` too)."""
    if isinstance(node, float):
        yield _key(path), node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, (*path, i))


def validate(data: Any, source: str = str(PARAMS)) -> Params:
    """Validate a parsed params mapping; raise StageError with one line naming the key."""
    import jsonschema

    if not isinstance(data, dict):
        fail(f"{source}: expected a mapping of sections, got {_describe(data)}")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        fail(f"{source}: {_message(errors[0])}{more}")
    for key, value in _numbers(data):
        if not math.isfinite(value):
            fail(f"{source}: {key}: got {value}, expected a finite number")
    params = with_presets(_build(Params, data))
    problems = _contradictions(params)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        fail(f"{source}: {problems[0]}{more}")
    return params


def read_yaml(path: Path) -> Any:
    """YAML 1.2, as DVC reads params (so `lr: 2e-4` is a number, not a string)."""
    from ruamel.yaml import YAML, YAMLError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(f"{path}: not found (run from the project root)")
    except UnicodeDecodeError as err:
        fail(f"{path}: not UTF-8 text (byte {err.start})")
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        fail(f"{path}:{where} not valid YAML ({getattr(err, 'problem', None) or err})")


def load(path: str | Path = PARAMS) -> Params:
    """Read and validate params.yaml (every stage calls this first)."""
    path = Path(path)
    return validate(read_yaml(path), str(path))


def log_section(name: str, section: Any) -> None:
    """Print the resolved section a stage reads (a dataclass, or a dict of them), so each run's log states
    its inputs."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else value

    print(f"[{name}] params: {json.dumps(plain(section), ensure_ascii=False)}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.params", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=str(PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema and exit")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(schema(), indent=2, ensure_ascii=False))
        return
    params = load(args.path)
    print(json.dumps(dataclasses.asdict(params), indent=2, ensure_ascii=False))
    print(f"{args.path}: valid", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main)

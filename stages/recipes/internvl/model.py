"""The internvl recipe's stand-in model (built by the stage stand_in), deterministically.

InternVL needs its model's own remote code, and no InternVL model is on a CPU machine. The stand-in
has InternVL2-2B's structure at a tiny size: InternViT (`modeling_intern_vit.py`, of the shape in
`stand_in.tiny.internvl`, random from its seed), `mlp1` over pixel-shuffled patch features (random), and as
language model the LLM stand-in (stand_in.tiny.llm, a tiny InternLM2 chat model) with the tokenizer
extended by `<img>`, `</img>` and `<IMG_CONTEXT>` (the vocabulary padded to a multiple of 64:
bitsandbytes' CPU 4-bit kernels need output rows in blocks of 32). The directory holds, as
InternVL2-2B's does, `modeling_internvl_chat.py` and `configuration_internvl_chat.py` (written for this
project: stages/recipes/internvl/remote_code/) beside InternViT's and InternLM2's code files, copied from the
installed XTuner package (stages/structures.py). It exercises the plumbing (training, conversion,
remote code, chat); it knows nothing. A real InternVL2-2B directory goes in `internvl.path` on a GPU
host.

Loads with `AutoModel.from_pretrained(path, trust_remote_code=True)` and `AutoTokenizer`. Same params,
same bytes.

    python -m stages.recipes.internvl.model --llm DIR --out DIR   # a stand-in by hand (the stage: stand_in@tiny)
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.paths import INTERNVL_MODEL

INTERNVL_CODE = Path(__file__).with_name("remote_code")  # the stand-in's own remote code (copied into it)
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]
# The system prompt XTuner's InternVL_V1_5_Dataset trains InternLM2-based models with; the stand-in's
# chat() uses it too, so its prompt at evaluation is the one it was trained on.
SYSTEM = "You are an AI assistant whose name is InternLM (书生·浦语)."
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what InternVL_V1_5_Dataset normalises tiles with
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_tokens(shape: P.TinyInternVL) -> int:
    """Image tokens per tile: (image_size / patch_size)^2 x downsample_ratio^2."""
    return int((shape.image_size // shape.patch_size) ** 2 * shape.downsample_ratio ** 2)


def image_token_counts(records: list[dict], folder: Path, model: Path) -> list[int]:
    """Image tokens of each record as XTuner's InternVL dataset makes them: the image's tiles (InternVL's
    dynamic tiling for its aspect ratio, plus a thumbnail) x tokens per tile, from `model`'s config.json."""
    from PIL import Image

    from stages.errors import fail
    from stages.io import read_json
    from stages.xtuner_api import internvl_tiles

    cfg = read_json(Path(model) / "config.json", "internvl.path (an InternVL model directory)")
    try:
        size, patch = int(cfg["force_image_size"]), int(cfg["vision_config"]["patch_size"])
        per_tile = int((size // patch) ** 2 * float(cfg["downsample_ratio"]) ** 2)
        tiling = (int(cfg.get("min_dynamic_patch", 1)), int(cfg.get("max_dynamic_patch", 6)), size,
                  bool(cfg.get("use_thumbnail", False)))
    except (KeyError, TypeError, ValueError) as err:
        fail(f"{Path(model) / 'config.json'}: lacks InternVL's {err} (not an InternVL model?)")
    sizes: dict[str, tuple[int, int]] = {}
    out = []
    for r in records:
        if "image" not in r:
            out.append(0)
            continue
        if r["image"] not in sizes:
            with Image.open(folder / r["image"]) as img:
                sizes[r["image"]] = img.size
        out.append(per_tile * internvl_tiles(sizes[r["image"]], *tiling))
    return out


def config_dict(shape: P.TinyInternVL, llm_config: dict) -> dict:
    """config.json of the stand-in: InternVL2's fields, an InternViT vision config (InternVL2-2B's keys),
    the tiny InternLM2's config."""
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
              "hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
              "num_hidden_layers": shape.num_layers, "num_attention_heads": shape.num_heads, "num_channels": 3,
              "image_size": shape.image_size, "patch_size": shape.patch_size, "hidden_act": "gelu",
              "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "qkv_bias": True, "qk_normalization": False,
              "use_flash_attn": True, "dropout": 0.0, "attention_dropout": 0.0, "drop_path_rate": 0.0,
              "initializer_range": 0.02, "initializer_factor": 1.0}
    # XTuner's InternVL dataset picks its chat template by `architectures` and accepts InternLM2 (or Phi-3):
    # a Llama-format tiny LLM (stand_in.tiny.llm.architecture: llama) speaks InternLM2's format, and its
    # `model_type` (llama) says what it is built as
    llm = {**llm_config, "architectures": ["InternLM2ForCausalLM"]}
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                         "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                         "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
            "vision_config": vision, "llm_config": llm, "template": "internlm2-chat", "system_message": SYSTEM,
            "select_layer": -1, "force_image_size": shape.image_size, "downsample_ratio": shape.downsample_ratio,
            "ps_version": "v2", "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
            "max_dynamic_patch": shape.max_dynamic_patch, "torch_dtype": llm.get("torch_dtype") or "float32"}


def write_code(folder: Path) -> None:
    """The stand-in's remote code: the project's InternVLChat files, InternViT's and InternLM2's."""
    from stages.structures import copy_code

    for code in sorted(INTERNVL_CODE.glob("*.py")):
        shutil.copy2(code, folder / code.name)
    copy_code("intern_vit", folder)
    copy_code("internlm2", folder)


def build(shape: P.TinyInternVL, llm: Path, out: Path) -> dict:
    """Write the stand-in to `out`, whole or not at all; return a summary."""
    from stages.io import output_dir, write_json
    from stages.modeldir import check, load_tokenizer
    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch
    from transformers import AutoConfig, AutoModel

    from stages.modeldir import load_model

    check(llm, "the stand-in's LLM")
    tokenizer = load_tokenizer(llm, "the stand-in's LLM")
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    lm = load_model(llm, "the stand-in's LLM", torch_dtype=torch.float32)
    torch.manual_seed(shape.seed)
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:  # a real-size LLM has rows to spare
        lm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    llm_config = {k: v for k, v in lm.config.to_dict().items()
                  if k not in ("_name_or_path", "transformers_version", "auto_map")}
    llm_config["torch_dtype"] = json.loads((llm / "config.json").read_text()).get("torch_dtype") or "float32"
    with output_dir(out) as tmp:
        write_code(tmp)
        write_json(tmp / "config.json", config_dict(shape, llm_config))
        config = AutoConfig.from_pretrained(str(tmp), trust_remote_code=True, local_files_only=True)
        torch.manual_seed(shape.seed)
        model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=torch.float32)
        model.language_model.load_state_dict(lm.state_dict())
        # stored in its LLM's dtype, as InternVL2-2B ships bfloat16 (its config's torch_dtype): a
        # float32 stand-in of a bf16 LLM would make the merge's bf16 rounding reach the vision weights
        model = model.to(getattr(torch, llm_config["torch_dtype"]))
        model.eval().save_pretrained(tmp, safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["auto_map"] = config_dict(shape, llm_config)["auto_map"]  # save_pretrained may drop it
        cfg.pop("_name_or_path", None)  # the temporary folder's name
        write_json(tmp / "config.json", cfg)
        tokenizer.save_pretrained(tmp)
        write_code(tmp)  # and rewrite them
    return {"path": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "vision_parameters": sum(p.numel() for p in model.vision_model.parameters()),
            "vocabulary": len(tokenizer), "embedding_rows": lm.get_input_embeddings().weight.shape[0],
            "image_tokens_per_tile": image_tokens(shape), **asdict(shape)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.recipes.internvl.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--llm", required=True, help="the stand-in's LLM (an InternLM2 model directory)")
    parser.add_argument("--out", default=str(INTERNVL_MODEL), help=f"output folder (default: {INTERNVL_MODEL})")
    args = parser.parse_args(argv)
    shape = P.load(args.params).stand_in.internvl
    P.log_section("internvl", shape)
    info = build(shape, Path(args.llm), Path(args.out))
    print(f"[internvl] {info['path']}: InternVL stand-in, {info['parameters']:,} parameters "
          f"({info['vision_parameters']:,} in the vision model), vocabulary {info['vocabulary']:,} "
          f"(+<img>, </img>, <IMG_CONTEXT>), {info['image_tokens_per_tile']} image tokens per tile", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="internvl")

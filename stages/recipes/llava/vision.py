"""The llava recipe's stand-in CLIP vision encoder (built by the stage stand_in), deterministically.

A randomly initialised `CLIPVisionModel` of the shape in `stand_in.tiny.llava`, from its fixed seed, and a
`CLIPImageProcessor` whose resize and centre crop match the encoder's image size (OpenAI CLIP's mean
and std). Same params, same bytes. Loads with `CLIPVisionModel.from_pretrained` /
`CLIPImageProcessor.from_pretrained`, as XTuner's LLaVA configs and `xtuner convert merge --is-clip` do.
On a real-model run (`stand_in: {}`) it is not built: a real CLIP (openai/clip-vit-large-patch14-336,
downloaded by hand) is linked into models/llava/vision (`python -m stages.link vision DIR`).

XTuner's LLaVA feeds the LLM the encoder's hidden_states[-2] minus the CLS token: (image_size /
patch_size)^2 image tokens per image.

    dvc repro stand_in@tiny          # with recipe: llava, writes models/llava/llm and models/llava/vision
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from stages import params as P
from stages.paths import LLAVA_VISION

# OpenAI CLIP's normalisation (what openai/clip-vit-large-patch14-336's processor uses).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_encoder(shape: P.TinyVision):
    """A randomly initialised CLIPVisionModel from the shape's seed (float32, eval mode)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        projection_dim=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_channels=3, image_size=shape.image_size,
        patch_size=shape.patch_size, hidden_act="quick_gelu", layer_norm_eps=1e-5, torch_dtype="float32")
    torch.manual_seed(shape.seed)
    return CLIPVisionModel(config).eval()


def build_processor(shape: P.TinyVision):
    """CLIPImageProcessor: resize the short side to image_size (bicubic), centre-crop a square."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": shape.image_size}, resample=3,
        do_center_crop=True, crop_size={"height": shape.image_size, "width": shape.image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, do_convert_rgb=True)


def image_tokens(shape: P.TinyVision) -> int:
    return (shape.image_size // shape.patch_size) ** 2


def encoder_image_tokens(p: P.Params) -> int:
    """Image tokens per image of the vision encoder (models/llava/vision): (image_size / patch_size)^2 of
    its config.json (ViT-L/14-336: 576)."""
    folder = LLAVA_VISION
    from stages.errors import fail
    from stages.io import read_json

    cfg = read_json(folder / "config.json", "the llava recipe's CLIP vision model")
    cfg = cfg.get("vision_config", cfg)
    try:
        return (int(cfg["image_size"]) // int(cfg["patch_size"])) ** 2
    except (KeyError, TypeError, ValueError):
        fail(f"{folder / 'config.json'}: has no image_size and patch_size (not a CLIP?)")


def build(shape: P.TinyVision, out: Path) -> dict:
    """Write the encoder (model.safetensors, config.json) and processor (preprocessor_config.json)
    to `out`, whole or not at all; return a summary."""
    from stages.io import output_dir
    from stages.xtuner_api import patch_stack

    patch_stack()
    model = build_encoder(shape)
    processor = build_processor(shape)
    with output_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return {"path": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "image_tokens": image_tokens(shape), **asdict(shape)}

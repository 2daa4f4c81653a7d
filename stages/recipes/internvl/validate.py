"""Stage validate, recipe internvl: the repeated CLoT-style data, measured as XTuner's InternVL dataset
encodes it, with the InternVL model's tokenizer and image tiling."""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.checks import IMAGE_TOKEN
from stages.dataset import _pieces, validate_dataset
from stages.io import read_json
from stages.paths import INTERNVL_MODEL, INTERNVL_REPEATED


def run(p: P.Params, template: dict) -> tuple[list, dict]:
    """(the records kept, their statistics); `template` is unused: XTuner's InternVL dataset has its own."""
    return validate_internvl(p)


# What XTuner's InternVL_V1_5_Dataset encodes for an InternLM2-based model: its own system line and
# instruction (it replaces the template's), the template's SUFFIX, no SEP between turns. The image is
# `<img>` + `<IMG_CONTEXT>` x its image tokens + `</img>` + newline; the context tokens are counted apart.
INTERNVL_TEMPLATE = {"SYSTEM": "<|im_start|>system\n{system}<|im_end|>",
                     "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|><|im_start|>assistant\n",
                     "SUFFIX": "<|im_end|>", "SEP": ""}


def internvl_pieces(record: dict, template: dict) -> list[str]:
    """As `llava_pieces`, for XTuner's InternVL dataset (its system prompt, `<img></img>` around the image)."""
    from stages.recipes.internvl.model import SYSTEM

    turns = [t["value"].strip() for t in record["conversations"]]
    if "image" in record:  # as the dataset: `<image>` out, the image string and a newline in front
        turns = [("<img></img>\n" + t.replace(IMAGE_TOKEN, "").strip()) if IMAGE_TOKEN in t else t for t in turns]
    return _pieces(SYSTEM, list(zip(turns[::2], turns[1::2])), template)


def validate_internvl(p: P.Params) -> tuple[list, dict]:
    """The repeated CLoT-style data, measured with the InternVL model's tokenizer and image tiling."""
    from stages.recipes.internvl.model import image_token_counts

    records = read_json(INTERNVL_REPEATED, "run `dvc repro prepare` first")
    folder = Path(p.data.internvl.image_folder)
    return validate_dataset(records, str(INTERNVL_REPEATED), "llava", INTERNVL_MODEL, INTERNVL_TEMPLATE, p.data, folder,
                            lambda checked: image_token_counts(checked, folder, INTERNVL_MODEL), internvl_pieces)

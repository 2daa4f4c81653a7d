"""Stage validate, recipe llava: the repeated LLaVA data; a record's length counts its image's tokens."""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.dataset import validate_dataset
from stages.io import read_json
from stages.paths import LLAVA_REPEATED, llm_dir


def run(p: P.Params, template: dict) -> tuple[list, dict]:
    from stages.recipes.llava.vision import encoder_image_tokens

    records = read_json(LLAVA_REPEATED, "run `dvc repro prepare` first")
    tokens: list[int] = []  # the encoder's image tokens, read once the records passed their checks

    def per_record(checked: list) -> list[int]:
        tokens.append(encoder_image_tokens(p))
        return [tokens[0] * ("image" in r) for r in checked]

    kept, stats = validate_dataset(records, str(LLAVA_REPEATED), "llava", llm_dir(p.recipe), template, p.data,
                                   Path(p.data.llava.image_folder), per_record)
    stats["image_tokens"] = tokens[0]
    return kept, stats

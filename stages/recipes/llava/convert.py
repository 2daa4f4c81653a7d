"""Stage convert, recipe llava: the same converter writes llm_adapter/, visual_encoder_adapter/ and
projector/, each checked."""
from __future__ import annotations

from pathlib import Path

from stages.errors import fail
from stages.io import output_dir
from stages.paths import ADAPTER, ADAPTER_PTH, CONFIG
from stages.xtuner_api import sort_targets

LLAVA_PARTS = ("llm_adapter", "visual_encoder_adapter", "projector")


def run(p, pipeline: dict) -> None:
    convert_llava(CONFIG, ADAPTER_PTH, ADAPTER, fp32=pipeline["precision"] == "fp32")


def convert_llava(config: Path, pth: Path, out: Path, fp32: bool) -> None:
    """pth_to_hf of a LLaVA fine-tune: the three parts, each checked."""
    from stages.xtuner_api import load_checkpoint_weights, pth_to_hf

    if not pth.is_file():
        fail(f"{pth}: not found; run `dvc repro train` first")
    load_checkpoint_weights(pth)
    with output_dir(out) as tmp:
        pth_to_hf(config, pth, tmp, fp32)
        missing = [part for part in LLAVA_PARTS if not (tmp / part).is_dir()]
        if missing:
            fail(f"{pth}: pth_to_hf wrote no {', '.join(missing)} (a LLaVA fine-tune with LoRA on both models "
                 "and a projector expected)")
        for part in LLAVA_PARTS[:2]:
            sort_targets(tmp / part)

"""Stage train, recipe internvl: XTuner's InternVL_V1_5 in the rendered dtype, in one process or many."""
from __future__ import annotations

from stages.paths import INTERNVL_MODEL, VALIDATED_INTERNVL


def setup(pipeline: dict) -> None:
    """XTuner's InternVL_V1_5 forces bf16, fp16 4-bit compute and flash attention, and asks for a process
    group: stages/xtuner_api.py patch_internvl makes it train in the rendered dtype here."""
    from stages.xtuner_api import patch_internvl

    patch_internvl(pipeline["torch_dtype"])


def before(p) -> dict:
    from stages.modeldir import check

    check(INTERNVL_MODEL)
    return {"data": VALIDATED_INTERNVL, "model": INTERNVL_MODEL}


def tokens_per_iter(pipeline: dict) -> float | None:
    return None  # not measured: XTuner's throughput hook serves the text recipe

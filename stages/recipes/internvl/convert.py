"""Stage convert, recipe internvl: XTuner's pth_to_hf has no InternVL path; the trained weights (LoRA,
mlp1) are checked and saved as adapter.safetensors (steps.py), and the merge stage runs convert_to_official."""
from __future__ import annotations

from stages.paths import ADAPTER, ADAPTER_PTH


def run(p, pipeline: dict) -> None:
    from stages.recipes.internvl import steps

    steps.save_adapter(ADAPTER_PTH, ADAPTER, {"r": p.lora.r, "alpha": p.lora.alpha, "dropout": p.lora.dropout})

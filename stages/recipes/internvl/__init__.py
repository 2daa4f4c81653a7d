"""Recipe internvl: XTuner's internvl_v2_internlm2_2b_qlora_finetune as the tutorial runs it (CLoT-style
witty captions): QLoRA on InternVL2-2B's LLM, frozen vision encoder, mlp1 trained; convert_to_official."""
from __future__ import annotations

from stages.paths import VALIDATED_INTERNVL

NAME = "internvl"
VALIDATED = VALIDATED_INTERNVL
SCORES_CHECKPOINTS = False  # stages/recipes/interface.py

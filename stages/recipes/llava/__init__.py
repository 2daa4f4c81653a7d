"""Recipe llava: XTuner's llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune:
QLoRA on the LLM, LoRA on a CLIP vision encoder, a projector between them (pretrained first by the
train stage unless `llava.pretrained_pth` gives one)."""
from __future__ import annotations

from stages.paths import VALIDATED_LLAVA

NAME = "llava"
VALIDATED = VALIDATED_LLAVA
SCORES_CHECKPOINTS = False  # stages/recipes/interface.py

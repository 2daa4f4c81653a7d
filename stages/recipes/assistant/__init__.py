"""Recipe assistant: the self-cognition text QLoRA of the InternLM2-chat-1.8B "personal assistant"
tutorial. Identity conversations generated from question/answer templates, mixed with general ones."""
from __future__ import annotations

from stages.paths import VALIDATED_ASSISTANT

NAME = "assistant"
VALIDATED = VALIDATED_ASSISTANT
SCORES_CHECKPOINTS = True  # stages/recipes/interface.py

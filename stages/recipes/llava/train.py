"""Stage train, recipe llava: the tutorial's two phases, the projector's first (pretrain.py)."""
from __future__ import annotations

import json

from stages.paths import LLAVA_VISION, PRETRAIN, VALIDATED_LLAVA, llm_dir


def setup(pipeline: dict) -> None:
    """Nothing to patch for XTuner's LLaVAModel."""


def before(p) -> dict:
    """The projector phase: the tokenized text and the projector (pretrained here, or llava.pretrained_pth
    checked) in models/pretrain/; what the fine-tune reads."""
    from stages.recipes.llava import pretrain

    s = pretrain.prepare(p, PRETRAIN)
    print(f"[train] {PRETRAIN}: {s['samples']} tokenized samples, projector from {s['projector_from']} "
          f"({len(s['projector_keys'])} tensors, checked against {llm_dir(p.recipe)} + {LLAVA_VISION})", flush=True)
    return {"data": VALIDATED_LLAVA, "model": llm_dir(p.recipe), "extra": (PRETRAIN,), "extra_models": (LLAVA_VISION,),
            "projector_before": PRETRAIN / "projector.pth"}


def tokens_per_iter(pipeline: dict) -> float | None:
    """The llava recipe's tokens per iteration (XTuner's throughput hook serves the text recipe only):
    micro-batch x GPUs x the mean tokenized sample, its image tokens included (the first phase's
    figure). Samples of one dataset differ little in length, and the sampler draws them all each epoch."""
    summary = PRETRAIN / "summary.json"
    if not summary.is_file():
        return None
    mean = json.loads(summary.read_text()).get("mean_tokens")
    return mean * pipeline["micro_batch"] * pipeline["gpus"] * pipeline.get("nodes", 1) if mean else None

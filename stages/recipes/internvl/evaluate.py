"""Stage evaluate, recipe internvl: each of `internvl.eval_images` with `internvl.eval_prompt`, asked of
the InternVL model and of the converted fine-tune through the model's own chat() (transformers), or on a
GPU host through LMDeploy with the `internvl2-internlm2` chat template (eval.backend; steps.py)."""
from __future__ import annotations


def run(p) -> tuple[list[dict], dict, str]:
    import torch

    from stages.generation import lmdeploy_configured, pick_backend
    from stages.recipes.internvl import steps

    backend = pick_backend(p.eval.backend, torch.cuda.is_available(), lmdeploy_configured())
    from stages.quiet import progress_bar

    with progress_bar(2 * len(p.internvl.eval_images), "[evaluate]", unit="image") as bar:
        rows, metrics = steps.evaluate(p, backend, bar.update)
    b, t = metrics["base"], metrics["tuned"]
    return rows, metrics, (f"{backend}, {len(rows)} images asked {p.internvl.eval_prompt!r}: captions matched "
                           f"{b['answer_match_rate']} -> {t['answer_match_rate']}, similarity "
                           f"{b['answer_similarity']} -> {t['answer_similarity']}")

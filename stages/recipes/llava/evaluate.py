"""Stage evaluate, recipe llava: each of `llava.eval_images` with `llava.eval_prompt` (or the image's own
first question in the data), asked of the model before fine-tuning (the LLM, the vision encoder and the
projector it started from) and of the merged fine-tune, greedy; answers equal to the data's, their
similarity to it, answer length and tokens/s."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages import params as P
from stages.errors import fail
from stages.generation import score_image_answers
from stages.io import read_json
from stages.paths import LLAVA_VISION, MERGED, llm_dir
from stages.quiet import progress_bar


def run(p: P.Params) -> tuple[list[dict], dict, str]:
    rows, metrics = evaluate_llava(p)
    b, t = metrics["base"], metrics["tuned"]
    return rows, metrics, (f"{len(rows)} image prompts: answers matching the data {b['answer_match_rate']} -> "
                           f"{t['answer_match_rate']}, similarity {b['answer_similarity']} -> {t['answer_similarity']}")


def evaluate_llava(p: P.Params) -> tuple[list[dict], dict]:
    """Image prompts before and after fine-tuning (see the module docstring)."""
    import torch

    from stages.recipes.llava import model as llava
    from stages.paths import ADAPTER_PTH

    folder = Path(p.data.llava.image_folder)
    known = llava.first_questions(read_json(Path(p.data.llava.source), "data.llava.source"))
    rows = []
    for image in p.llava.eval_images:
        if not (folder / image).is_file():
            fail(f"llava.eval_images: {image}: not found in data.llava.image_folder ({folder})")
        question, reference = known.get(image, (None, None))
        prompt = p.llava.eval_prompt or question
        if prompt is None:
            fail(f"llava.eval_images: {image} is not in {p.data.llava.source}; set llava.eval_prompt to ask about it")
        rows.append({"prompt": prompt, "kind": "image", "image": str(folder / image),
                     "reference": reference if prompt == question else None})
    projector = torch.load(ADAPTER_PTH, map_location="cpu", weights_only=True)["projector_before"]
    models = {"base": lambda: llava.Chat.load(llm_dir(p.recipe), LLAVA_VISION, projector,
                                              template=p.train.prompt_template),
              "tuned": lambda: llava.Chat.load(MERGED / "llm", MERGED / "visual_encoder", MERGED / "projector",
                                               template=p.train.prompt_template)}
    metrics: dict[str, Any] = {"backend": "transformers", "prompts": len(rows)}
    bar = progress_bar(len(models) * len(rows), "[evaluate]", unit="image")
    for side, load in models.items():
        chat = load()
        chat.answer(Path(rows[0]["image"]), rows[0]["prompt"], 2, p.eval.system)  # warm-up, untimed
        torch.manual_seed(p.eval.seed)
        n_tokens, start = 0, time.time()
        for row in rows:
            row[side], n = chat.answer(Path(row["image"]), row["prompt"], p.eval.max_new_tokens, p.eval.system)
            n_tokens += n
            bar.update(1)
        seconds = time.time() - start
        metrics[side] = score_image_answers(rows, side, n_tokens, seconds)
        del chat
    bar.close()
    return rows, metrics

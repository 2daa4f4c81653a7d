"""Stage merge, recipe internvl: XTuner's convert_to_official (merges LoRA, saves bfloat16), the model's
remote-code files copied in (the tool does not), checked against the trained model (steps.py)."""
from __future__ import annotations

from stages.paths import MERGED


def run(p) -> tuple[dict, list[str]]:
    from stages.recipes.internvl import steps

    metrics = steps.run_merge(p)
    lines = [f"{MERGED}: convert_to_official ({metrics['dtype']}) + remote code "
             f"{', '.join(metrics['remote_code_copied']) or '(none)'}; trained vs converted max |logit diff| "
             f"{metrics['max_logit_diff']:.2e} (tolerance {metrics['tolerance']:g}; "
             f"{metrics['max_logit_diff_unrounded']:.2e} before rounding to {metrics['dtype']})"]
    kept, trained = metrics["max_logit_change_from_base"], metrics["trained_max_logit_change_from_base"]
    if trained and kept < trained / 2:
        lines.append(f"warning: in {metrics['dtype']} the converted model moved {kept:.3g} from the base model "
                     f"where the trained one moved {trained:.3g}: most of this run's update is below the weights' "
                     "rounding step (a short run, or a small learning rate)")
    return metrics, lines

"""Stage `report`: reports/report.md, the page a reviewer reads in a pull request.

The params that matter (with what `auto` became on this machine), data statistics, the loss curve
(reports/loss.png), training and merge figures, the evaluation metrics and every answer of the base
and the tuned model side by side, and the wall time and peak memory of each stage. The headline
numbers also go to reports/metrics.json for `dvc metrics diff`.

Recipe llava: the same page, with the vision encoder and projector in the params, and the image
prompts as a table of thumbnails (the images themselves, referenced relative to reports/) with the
data's answer and the answers before and after fine-tuning side by side.

Recipe internvl: the same, with the tutorial's image prompt, the captions and the conversion check.

    python -m stages.report
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P
from stages.io import write_json, write_text
from stages.paths import LOSS_PNG, REPORT, REPORTS


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages import recipes

    params = P.load(args.params)
    text, numbers = recipes.step(params.recipe, "report").build(params)  # stages/recipes/<recipe>/report.py
    write_text(REPORT, text)
    write_json(REPORTS / "metrics.json", numbers)
    print(f"[report] {REPORT}, {LOSS_PNG}, {REPORTS / 'metrics.json'}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="report")

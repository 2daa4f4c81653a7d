"""Stage `validate`: nothing reaches training unless it passed here.

For the selected recipe's dataset (the generated self-cognition conversations; the repeated LLaVA data;
the repeated CLoT-style InternVL data, measured as XTuner's InternVL dataset encodes it) it checks
every record (JSON Schema of its format; roles alternate; no empty content; images exist and decode;
exactly one `<image>` per image sample), measures token lengths with the base model's tokenizer and
XTuner's prompt template (a LLaVA record's image tokens included), counts records over
`data.max_length` and duplicates. A bad record fails the stage with a line naming the file, the
records, the field and the reason. What passes is
written to data/validated/<recipe>/ (the only data the training stages read) and the statistics to
reports/data_stats.json (a DVC metric: `dvc metrics diff` compares them).

    python -m stages.validate
"""
from __future__ import annotations

import argparse
from typing import Sequence

from stages import params as P
from stages.io import output_dir, write_json, write_jsonl
from stages.paths import DATA_STATS


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    data = params.data
    P.log_section("validate", {"max_length": data.max_length, "overlong": data.overlong,
                               params.recipe: getattr(data, params.recipe)})
    from stages.xtuner_api import prompt_template

    template = prompt_template(params.train.prompt_template)
    from stages import recipes

    recipe = recipes.get(params.recipe)
    kept, stats = recipes.step(params.recipe, "validate").run(params, template)  # stages/recipes/<recipe>/validate.py
    with output_dir(recipe.VALIDATED.parent) as tmp:
        if recipe.VALIDATED.suffix == ".jsonl":
            write_jsonl(tmp / recipe.VALIDATED.name, kept)
        else:
            write_json(tmp / recipe.VALIDATED.name, kept, indent=None)
    write_json(DATA_STATS, {"max_length": data.max_length, params.recipe: stats})
    t = stats["tokens"]
    print(f"[validate] {recipe.VALIDATED}: {stats['kept']}/{stats['records']} records kept, tokens min {t['min']} "
          f"p50 {t['p50']} p95 {t['p95']} max {t['max']}, {stats['over_max_length']} over max_length "
          f"{data.max_length}, duplicates {stats['duplicate_rate']:.1%}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="validate")

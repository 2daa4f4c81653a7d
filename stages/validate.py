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
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from stages import params as P
from stages.checks import IMAGE_TOKEN, Problem, check_records, raise_problems
from stages.errors import fail
from stages.io import output_dir, read_json, read_jsonl, write_json, write_jsonl
from stages.paths import DATA_STATS, INTERNVL_MODEL, INTERNVL_REPEATED, llm_dir, LLAVA_REPEATED, SELF_COGNITION


def openai_pieces(record: dict, template: dict) -> list[str]:
    """The texts XTuner encodes for a conversation (openai_map_fn, then the prompt template)."""
    msgs = record["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    turns = [m["content"] for m in msgs if m["role"] != "system"]
    return _pieces(system, list(zip(turns[::2], turns[1::2])), template)


def llava_pieces(record: dict, template: dict) -> list[str]:
    """As `openai_pieces`, for a LLaVA record; `<image>` is left out (its tokens come from the encoder)."""
    turns = [t["value"].replace(IMAGE_TOKEN, "").strip() for t in record["conversations"]]
    return _pieces("", list(zip(turns[::2], turns[1::2])), template)


# What XTuner's InternVL_V1_5_Dataset encodes for an InternLM2-based model: its own system line and
# instruction (it replaces the template's), the template's SUFFIX, no SEP between turns. The image is
# `<img>` + `<IMG_CONTEXT>` x its image tokens + `</img>` + newline; the context tokens are counted apart.
INTERNVL_TEMPLATE = {"SYSTEM": "<|im_start|>system\n{system}<|im_end|>",
                     "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|><|im_start|>assistant\n",
                     "SUFFIX": "<|im_end|>", "SEP": ""}


def internvl_pieces(record: dict, template: dict) -> list[str]:
    """As `llava_pieces`, for XTuner's InternVL dataset (its system prompt, `<img></img>` around the image)."""
    from stages.recipes.internvl.model import SYSTEM

    turns = [t["value"].strip() for t in record["conversations"]]
    if "image" in record:  # as the dataset: `<image>` out, the image string and a newline in front
        turns = [("<img></img>\n" + t.replace(IMAGE_TOKEN, "").strip()) if IMAGE_TOKEN in t else t for t in turns]
    return _pieces(SYSTEM, list(zip(turns[::2], turns[1::2])), template)


def _pieces(system: str, pairs: list[tuple[str, str]], template: dict) -> list[str]:
    out = []
    for n, (user, answer) in enumerate(pairs, 1):
        prefix = template.get("SYSTEM", "").format(system=system) if system and n == 1 else ""
        out.append(prefix + template["INSTRUCTION"].format(input=user, round=n))
        out.append(answer + template.get("SUFFIX", "") + (template.get("SEP", "") if n < len(pairs) else ""))
    return out


def token_lengths(records: list, pieces: Callable[[dict, dict], list[str]], tokenizer: Any,
                  template: dict) -> list[int]:
    """Tokens per record as XTuner's encode_fn counts them: pieces encoded one by one, plus BOS."""
    all_pieces = [pieces(r, template) for r in records]
    flat = [p for ps in all_pieces for p in ps]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    lengths, i = [], 0
    for ps in all_pieces:
        lengths.append(1 + sum(len(x) for x in ids[i:i + len(ps)]))
        i += len(ps)
    return lengths


def duplicate_rate(records: list, ignore: tuple[str, ...] = ()) -> float:
    seen, dups = set(), 0
    for r in records:
        key = json.dumps({k: v for k, v in r.items() if k not in ignore}, sort_keys=True, ensure_ascii=False)
        dups += key in seen
        seen.add(key)
    return round(dups / len(records), 4)


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def length_stats(lengths: list[int]) -> dict:
    return {"min": min(lengths), "mean": round(statistics.fmean(lengths), 1), "p50": percentile(lengths, 0.5),
            "p95": percentile(lengths, 0.95), "max": max(lengths)}


def apply_overlong(records: list, lengths: list[int], file: str, data: P.Data, image_tokens: int = 0) -> list:
    """Records over max_length: listed as errors, dropped, or kept for XTuner to truncate."""
    over = [i for i, n in enumerate(lengths) if n > data.max_length]
    of_them = f" ({image_tokens} of them the image's)" if image_tokens else ""
    if over and data.overlong == "error":
        raise_problems([Problem(file, i, "", f"{lengths[i]} tokens{of_them} > data.max_length {data.max_length} "
                                             "(raise it, or set data.overlong: drop or truncate)")
                        for i in over])
    if over and data.overlong == "drop":
        keep = set(range(len(records))) - set(over)
        return [r for i, r in enumerate(records) if i in keep]
    return records


def validate_dataset(records: list, file: str, fmt: str, tokenizer: Any, template: dict, data: P.Data,
                     image_folder: Path | None = None,
                     image_tokens: int | Callable[[list], list[int]] = 0) -> tuple[list, dict]:
    """Check, measure and filter one dataset; returns (records kept, statistics). A LLaVA record's
    length counts its image's `image_tokens` too: they share the LLM's context (XTuner cuts the text
    at max_length minus them). `fmt` internvl: LLaVA-format records as XTuner's InternVL dataset
    encodes them, `image_tokens` a function giving one count per record (an image's tiles depend on its
    shape), called once the records passed their checks. `tokenizer` may be the model folder, loaded
    once the records passed (a data mistake is reported without a model)."""
    raise_problems(check_records(records, file, "openai" if fmt == "openai" else "llava", image_folder))
    if isinstance(tokenizer, Path):
        from stages.modeldir import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    pieces = {"openai": openai_pieces, "llava": llava_pieces, "internvl": internvl_pieces}[fmt]
    lengths = token_lengths(records, pieces, tokenizer, template)
    per = image_tokens(records) if callable(image_tokens) else [image_tokens if "image" in r else 0 for r in records]
    lengths = [n + k for n, k in zip(lengths, per)]
    kept = apply_overlong(records, lengths, file, data, max(per, default=0))
    if not kept:
        fail(f"{file}: every record is longer than data.max_length {data.max_length}; nothing left to train on")
    stats = {"records": len(records), "kept": len(kept), "dropped": len(records) - len(kept),
             "tokens": length_stats(lengths), "over_max_length": sum(n > data.max_length for n in lengths),
             "duplicate_rate": duplicate_rate(records, ignore=("id",))}
    if fmt != "openai":
        images = [r["image"] for r in records if "image" in r]
        stats.update(image_records=len(images), unique_images=len(set(images)))
    return kept, stats


def validate_internvl(p: P.Params) -> tuple[list, dict]:
    """The repeated CLoT-style data, measured with the InternVL model's tokenizer and image tiling."""
    from stages.recipes.internvl.model import image_token_counts

    records = read_json(INTERNVL_REPEATED, "run `dvc repro prepare` first")
    folder = Path(p.data.internvl.image_folder)
    return validate_dataset(records, str(INTERNVL_REPEATED), "internvl", INTERNVL_MODEL, INTERNVL_TEMPLATE, p.data, folder,
                            lambda checked: image_token_counts(checked, folder, INTERNVL_MODEL))


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
    if params.recipe == "internvl":
        kept, stats = validate_internvl(params)
    elif params.recipe == "llava":
        from stages.recipes.llava.vision import encoder_image_tokens

        records = read_json(LLAVA_REPEATED, "run `dvc repro prepare` first")
        kept, stats = validate_dataset(
            records, str(LLAVA_REPEATED), "llava", llm_dir(params.recipe), template, data,
            Path(data.llava.image_folder), lambda checked: [encoder_image_tokens(params) * ("image" in r) for r in checked])
        stats["image_tokens"] = encoder_image_tokens(params)
    else:
        records = read_jsonl(SELF_COGNITION, "run `dvc repro prepare` first")
        kept, stats = validate_dataset(records, str(SELF_COGNITION), "openai", llm_dir(params.recipe),
                                       template, data)
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

"""A dataset checked and measured as XTuner will encode it, shared by the recipes' validate steps: every
record's checks (stages/checks.py), token lengths with the base model's tokenizer and XTuner's prompt
template (a LLaVA record's image tokens included), records over `data.max_length`, duplicates."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable

from stages import params as P
from stages.checks import IMAGE_TOKEN, Problem, check_records, raise_problems
from stages.errors import fail


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
                     image_tokens: int | Callable[[list], list[int]] = 0,
                     pieces: Callable[[dict, dict], list[str]] | None = None) -> tuple[list, dict]:
    """Check, measure and filter one dataset; returns (records kept, statistics). A LLaVA record's
    length counts its image's `image_tokens` too: they share the LLM's context (XTuner cuts the text
    at max_length minus them). `fmt`: openai or llava (the records' format); `pieces` what XTuner encodes of
    a record (default: the format's); `image_tokens` a number, or a function giving one count per record
    (InternVL: an image's tiles depend on its shape), called once the records passed their checks. `tokenizer` may be the model folder, loaded
    once the records passed (a data mistake is reported without a model)."""
    raise_problems(check_records(records, file, "openai" if fmt == "openai" else "llava", image_folder))
    if isinstance(tokenizer, Path):
        from stages.modeldir import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    pieces = pieces or {"openai": openai_pieces, "llava": llava_pieces}[fmt]
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

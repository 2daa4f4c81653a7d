"""Record checks for the two dataset formats: a JSON Schema each, plus what a schema cannot say.

Every check returns `Problem`s (file, index, field, reason) instead of raising, so a stage can list
the first few offending records and a count in one line (`raise_problems`).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from stages.errors import fail

SCHEMAS = Path(__file__).parent / "schemas"
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Problem:
    file: str
    index: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"[{self.index}] {self.field}: {self.reason}" if self.field else f"[{self.index}] {self.reason}"


def raise_problems(problems: list[Problem], shown: int = 3) -> None:
    """Fail with one line: the file, how many records are bad, the first few, and the rest's count."""
    if not problems:
        return
    by_file: dict[str, list[Problem]] = {}
    for p in problems:
        by_file.setdefault(p.file, []).append(p)
    file, mine = next(iter(by_file.items()))
    records = len({p.index for p in mine})
    listed = "; ".join(map(str, mine[:shown]))
    rest = f"; and {len(mine) - shown} more" if len(mine) > shown else ""
    others = f" (and {len(problems) - len(mine)} in other files)" if len(by_file) > 1 else ""
    fail(f"{file}: {records} bad record{'s' if records > 1 else ''}: {listed}{rest}{others}")


@functools.cache
def _validator(name: str) -> Any:
    import jsonschema

    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _field(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_problems(name: str, record: Any, file: str, index: int) -> list[Problem]:
    errors = sorted(_validator(name).iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    out = []
    for err in errors[:1]:  # the first error of a record says enough
        where = _field(err.absolute_path)
        if err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance][0]
            where, reason = (f"{where}.{missing}" if where else missing), "missing"
        elif err.validator == "enum":
            reason = f"{err.instance!r} is not one of {', '.join(err.validator_value)}"
        elif err.validator == "type":
            reason = f"expected {err.validator_value if isinstance(err.validator_value, str) else ' or '.join(err.validator_value)}, got {type(err.instance).__name__}"
        elif err.validator == "minItems":
            reason = f"{len(err.instance)} turns, need at least {err.validator_value}"
        else:
            reason = err.message
        out.append(Problem(file, index, where, reason))
    return out


def check_openai(record: Any, file: str, index: int) -> list[Problem]:
    """A conversation for openai_map_fn: optional system first, then user/assistant alternating."""
    problems = _schema_problems("openai_messages", record, file, index)
    if problems:
        return problems
    expected = "user"
    for i, msg in enumerate(record["messages"]):
        where = f"messages[{i}]"
        if not msg["content"].strip():
            return [Problem(file, index, f"{where}.content", "empty")]
        if msg["role"] == "system":
            if i != 0:
                return [Problem(file, index, f"{where}.role", "system is only allowed as the first message")]
            continue
        if msg["role"] != expected:
            return [Problem(file, index, f"{where}.role", f"{msg['role']!r} where {expected!r} was expected "
                                                           "(roles alternate user/assistant)")]
        expected = "assistant" if expected == "user" else "user"
    if expected != "user":
        return [Problem(file, index, "messages", "ends with a user turn; the last message must be the "
                                                 "assistant's answer")]
    return []


def check_llava(record: Any, file: str, index: int, image_folder: Path | None = None) -> list[Problem]:
    """A LLaVA record: human/gpt alternating, one `<image>` iff there is an image, the image decodes."""
    problems = _schema_problems("llava_conversations", record, file, index)
    if problems:
        return problems
    turns = record["conversations"]
    for i, turn in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != want:
            return [Problem(file, index, f"conversations[{i}].from",
                            f"{turn['from']!r} where {want!r} was expected (turns alternate human/gpt)")]
        if not turn["value"].replace(IMAGE_TOKEN, "").strip():
            return [Problem(file, index, f"conversations[{i}].value", "empty")]
    if len(turns) % 2:
        return [Problem(file, index, "conversations", "ends with a human turn; the last turn must be gpt's")]
    n_images = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if "image" in record and n_images != 1:
        return [Problem(file, index, "conversations",
                        f"{n_images} {IMAGE_TOKEN} tokens in a sample with an image; exactly 1 is required")]
    if "image" not in record and n_images:
        return [Problem(file, index, "conversations", f"{IMAGE_TOKEN} in a sample without an image")]
    if "image" in record and image_folder is not None:
        reason = image_problem(str(image_folder / record["image"]))
        if reason:
            return [Problem(file, index, "image", f"{record['image']}: {reason}")]
    return []


def image_problem(path: str) -> str | None:
    """Why the image at `path` cannot be used, or None. Cached per file version: repeated data
    names the same files many times."""
    file = Path(path)
    if not file.is_file():
        return f"not found in the image folder ({file.parent})"
    st = file.stat()
    return _decode_problem(str(file.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _decode_problem(path: str, mtime_ns: int, size: int) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"does not decode ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def check_records(records: Any, file: str, fmt: str, image_folder: Path | None = None) -> list[Problem]:
    """Check a whole dataset; an empty one or one that is not a list of records is a problem too."""
    if not isinstance(records, list):
        fail(f"{file}: expected a list of records, got {type(records).__name__}")
    if not records:
        fail(f"{file}: the dataset is empty")
    problems: list[Problem] = []
    for i, rec in enumerate(records):
        problems += check_openai(rec, file, i) if fmt == "openai" else check_llava(rec, file, i, image_folder)
    return problems

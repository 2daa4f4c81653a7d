"""Small file helpers shared by the stages: outputs appear whole or not at all."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.errors import fail


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a kill never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_torch(path: Path, obj: Any) -> None:
    """torch.save via `path` with the suffix .tmp and a rename. torch names the archive inside after the file
    it writes, so every writer of a file shares this name to give the same bytes for the same tensors."""
    import torch

    tmp = path.with_suffix(".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: Path, records: Iterable[Any]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def output_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename. Its name has no
    dots: transformers imports a model directory's remote code as a package named after the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"_{path.name.replace('.', '_')}_partial_"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file; a missing or undecodable one is one line naming it and what it is for."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(f"{path}: not found ({what})")
    except UnicodeDecodeError as err:
        fail(f"{path}: not UTF-8 text (byte {err.start})")
    except OSError as err:  # a folder, no permission
        fail(f"{path}: cannot be read ({err.strerror or err}; {what})")


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file is one line naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        fail(f"{path}: line {err.lineno} column {err.colno}: not valid JSON ({err.msg})")


def read_jsonl(path: Path, what: str) -> list[Any]:
    """Parse a JSON Lines file (blank lines skipped); errors name the file and line."""
    text = read_text(path, what)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                fail(f"{path}: line {n} column {err.colno}: not valid JSON ({err.msg})")
    return out

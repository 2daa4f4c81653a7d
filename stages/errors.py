"""The one way a stage fails on bad input: a `StageError` becomes one line on stderr and exit 1.

Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, NoReturn, Sequence


class StageError(Exception):
    """Bad input: the message names the key, file or record and what is allowed."""


def fail(message: str) -> NoReturn:
    raise StageError(message)


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Entry point of every `python -m stages.<name>`: runs `main`, turns a StageError into one line."""
    _isolate_caches()
    start = time.time()
    try:
        main(argv)
        spec = getattr(sys.modules.get(main.__module__), "__spec__", None)
        name = (spec.name if spec else main.__module__).rsplit(".", 1)[-1]
        print(f"[{name}] done in {time.time() - start:.1f} s", file=sys.stderr, flush=True)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def _isolate_caches() -> None:
    """Nothing is fetched from a hub at run time and no cache leaves the project."""
    from stages.paths import CACHE

    cache = os.path.abspath(CACHE)
    os.environ.setdefault("HF_HOME", os.path.join(cache, "huggingface"))
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(cache, "huggingface", "datasets"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

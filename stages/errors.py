"""The one way a stage fails on bad input: a `StageError` becomes one line on stderr and exit 1.

Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import time
from typing import Callable, NoReturn, Sequence

# A process that imported torch, transformers and XTuner holds about a million objects, and Python's last
# garbage collections at exit walk them all: 1.0-1.4 s of CPU after a stage is done, for nothing (the
# process's memory goes back at once). The exit handlers run first (last registered, first run), then
# this moves every object out of the collector's reach: what a handler closed is closed, the modules are
# still torn down, only the final walk is skipped.
atexit.register(gc.freeze)

# While a stage process imports its stack (torch, transformers, XTuner: most of a CPU stage's start), Python's
# collector runs about 1,500 times, eight of them over every object there is, and finds almost nothing: the
# imports make modules, classes and functions, which live until exit. A stage's process therefore starts
# with the youngest generation collected every START_THRESHOLD new objects instead of Python's 700, and
# `settle()` puts Python's own thresholds back, after freezing what the imports made, where a stage starts
# its real work with models (before a model is loaded, before the trainer starts): from there on, garbage that
# holds tensors is collected as soon as Python would, and the models come after the freeze, so one dropped is
# freed. CPU time, 3 runs each alternated (benchmarks/cpu.md): a 6-iteration train stage 9.8 -> 8.2 s,
# evaluate 4.7 -> 4.2 s, validate 3.5 -> 3.2 s.
START_THRESHOLD = 100_000
_PYTHONS_THRESHOLDS: list[tuple[int, int, int]] = []


def _start_quickly() -> None:
    if not _PYTHONS_THRESHOLDS:
        _PYTHONS_THRESHOLDS.append(gc.get_threshold())
        gc.set_threshold(START_THRESHOLD, *gc.get_threshold()[1:])


def settle() -> None:
    """The stack is imported and the real work begins: what exists now is frozen (never collected, never
    walked again) and Python's own collection thresholds are back. Does nothing in a process that did not
    start through `run` (the tests' own processes), and after its first call."""
    if _PYTHONS_THRESHOLDS:
        gc.freeze()
        gc.set_threshold(*_PYTHONS_THRESHOLDS.pop())


class StageError(Exception):
    """Bad input: the message names the key, file or record and what is allowed."""


def fail(message: str) -> NoReturn:
    raise StageError(message)


def run(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None,
        stage: str | None = None) -> None:
    """Entry point of every `python -m stages.<name>`: runs `main`, turns a StageError into one line.
    A pipeline stage (`stage` named) also records its wall time and peak memory. As a process's entry point
    (`argv` None) it collects garbage rarely until `settle()`."""
    if argv is None:
        _start_quickly()
    _isolate_caches()
    silence_deepspeed()
    start = time.time()
    try:
        main(argv)
        if stage and _RECORDED:
            record_stage(stage, time.time() - start)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except ModuleNotFoundError as err:  # a package the stages need, missing from this Python: run by another one
        top = (err.name or "").split(".")[0]
        if not top or top == "stages":
            raise  # the project's own module: a bug, not the environment
        print(f"error: the Python package {top!r} is not installed for {sys.executable}: run the stages in the "
              f"project's environment (`make repro`, or .venv/bin first on PATH; README, quick start)", file=sys.stderr)
        sys.exit(1)


# Where DeepSpeed's notices below WARNING go while a trainer's log file is open (stages/quiet.py sets it)
DEEPSPEED_LOG: list[logging.Handler] = []


def verbose() -> bool:
    """`PIPELINE_VERBOSE=1`: the libraries' output on the terminal, as they print it (stages/quiet.py)."""
    return os.environ.get("PIPELINE_VERBOSE", "") not in ("", "0")


class _DeepSpeedFilter(logging.Filter):
    """Every process that imports DeepSpeed prints which accelerator it found, twice: dropped. Its other
    notices below WARNING go to the open trainer log, else are dropped. `PIPELINE_VERBOSE=1`: all kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        if record.filename == "real_accelerator.py":
            return False
        if record.levelno >= logging.WARNING:
            return True
        if DEEPSPEED_LOG:
            DEEPSPEED_LOG[0].handle(record)
        return False


def silence_deepspeed() -> None:
    """The filter on DeepSpeed's logger, set before DeepSpeed is imported: it creates the logger with
    `logging.getLogger`, sets its level and adds a handler, and keeps filters set before."""
    log = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedFilter) for f in log.filters):
        log.addFilter(_DeepSpeedFilter())


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


_NOTES: dict = {}
_RECORDED = True


def leave_unrecorded() -> None:
    """This process's run is not the stage's record: torchrun's workers, and the nodes other than 0 of a
    run over several (they share the project, and node 0's stage writes reports/stages/train.json)."""
    global _RECORDED
    _RECORDED = False


def note(**figures) -> None:
    """Figures a stage knows better than the process does (the trainer's own GPU peak: mmengine
    resets torch's peak counters at every log interval), merged into its stage record."""
    _NOTES.update(figures)


def record_stage(name: str, wall: float) -> None:
    """reports/stages/<name>.json: wall time and peak memory of this run (a DVC metric)."""
    import resource

    from stages.paths import STAGE_TIMES

    rss_kb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    stats = {"wall_time_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}  # the largest process's
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # what PyTorch's allocator held at most (what the planner's estimate is of, stages/memory.py)
        stats["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    stats.update(_NOTES)
    import json  # written here, not through stages.io, which reports its own failures through this module

    STAGE_TIMES.mkdir(parents=True, exist_ok=True)
    (STAGE_TIMES / f"{name}.json").write_text(json.dumps(stats, ensure_ascii=False) + "\n", encoding="utf-8")
    gpu = f", GPU {stats['peak_gpu_mb']:,.0f} MB" if stats.get("peak_gpu_mb") else ""
    if stats.get("peak_gpu_reserved_mb"):
        gpu += f" ({stats['peak_gpu_reserved_mb']:,.0f} MB reserved)"
    print(f"[{name}] done in {wall:.1f} s, peak memory {stats['peak_rss_mb']:,.0f} MB{gpu}", file=sys.stderr,
          flush=True)

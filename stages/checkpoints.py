"""The train stage's checkpoints (models/checkpoints/iter_N.pth, adapter weights alone) as the select
stage reads them, and the chosen one's copy into models/adapter.pth."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from stages.errors import fail
from stages.paths import ADAPTER_PTH, CHECKPOINTS


def step_of(path: Path) -> int:
    return int(path.stem.split("_", 1)[1])


def saved(folder: Path = CHECKPOINTS) -> list[Path]:
    """iter_N.pth files in `folder`, by step; none is one line."""
    found = sorted(folder.glob("iter_*.pth"), key=step_of) if folder.is_dir() else []
    if not found:
        fail(f"{folder}: no checkpoints (iter_N.pth); run `dvc repro train` first")
    return found


def adopt(path: Path, out: Path = ADAPTER_PTH) -> None:
    """The chosen checkpoint's file copied to `out`, atomically."""
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, out)


def image_recipe_run(p, recipe: str) -> tuple[dict, list[dict], list[dict], str]:
    """The select step of a recipe whose answers are not scored (llava, internvl): its last checkpoint."""
    ckpts = saved()
    adopt(ckpts[-1])
    last = step_of(ckpts[-1])
    note = "" if p.select.rule == "last" else f" (select.rule {p.select.rule} scores the assistant recipe only)"
    return ({"rule": "last", "chosen_step": last, "last_step": last, "scored": False},
            [{"step": step_of(c)} for c in ckpts], [],
            f"{recipe}: the last checkpoint, {ckpts[-1].name}, into {ADAPTER_PTH}{note}")

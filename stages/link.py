"""Put your own model into the selected recipe's model folder, for a real-model run.

Each recipe reads its models from models/<recipe>/ (stages/paths.py MODEL_ROLES), the one model dep of
its stages in dvc.yaml:

  assistant  llm      internlm2-chat-1_8b
  llava      llm      internlm2-chat-1_8b
             vision   clip-vit-large-patch14-336
  internvl   model    InternVL2-2B (its remote code included)

This writes models/<recipe>/<role>/ as a folder of file symlinks to your model's files, the layout of
the Hugging Face cache's snapshots: nothing is copied, and DVC hashes the files the links point to, so
a changed model reruns what reads it. Set `stand_in: {}` in params.yaml first (the stand-ins would
overwrite the folder). A stand-in the pipeline built there, or links made here before, are replaced; a
folder that holds files of its own is never touched.

    python -m stages.link llm /root/share/new_models/Shanghai_AI_Laboratory/internlm2-chat-1_8b
    python -m stages.link vision /path/to/clip-vit-large-patch14-336      # recipe: llava
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.errors import fail
from stages.paths import MODEL_ROLES, STAND_IN_MARK


def only_links(folder: Path) -> bool:
    """True when `folder` holds nothing but file symlinks (in subfolders too): a tree this module made."""
    return all(f.is_symlink() or f.is_dir() for f in folder.rglob("*"))


def link_tree(source: Path, target: Path) -> int:
    """`target` as a folder of absolute symlinks to every file under `source`; the number of files."""
    tmp = target.with_name(f"_{target.name}_partial_")
    shutil.rmtree(tmp, ignore_errors=True)
    n = 0
    for f in sorted(source.rglob("*")):
        if f.is_file():
            dest = tmp / f.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f.resolve(), dest)
            n += 1
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.link", description=__doc__.split("\n\n")[0],
                                     epilog="roles: " + "; ".join(f"{r}: {', '.join(roles)}"
                                                                  for r, roles in MODEL_ROLES.items()))
    parser.add_argument("role", help="llm, vision (llava) or model (internvl)")
    parser.add_argument("source", help="your model's folder (config.json, tokenizer, weights)")
    parser.add_argument("--recipe", help="the recipe whose folder to fill (default: params.yaml's recipe)")
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    recipe = args.recipe or params.recipe
    if recipe not in MODEL_ROLES:
        fail(f"--recipe: {recipe!r} is not a recipe ({', '.join(MODEL_ROLES)})")
    roles = MODEL_ROLES[recipe]
    if args.role not in roles:
        fail(f"role: the {recipe} recipe reads {', '.join(roles)}, not {args.role!r}")
    if params.stand_in is not None and recipe == params.recipe:
        fail(f"stand_in: set `stand_in: {{}}` in {args.params} first; stand_in@tiny would overwrite "
             f"{roles[args.role]} with its stand-in")
    source = Path(args.source).expanduser()
    if not (source / "config.json").is_file():
        fail(f"{source}: not a model folder (no config.json)")
    target = roles[args.role]
    if target.exists() and not target.is_symlink() and not only_links(target) and \
            not (target / STAND_IN_MARK).is_file():
        fail(f"{target}: holds files of its own; move them away first (nothing is overwritten)")
    target.parent.mkdir(parents=True, exist_ok=True)
    n = link_tree(source, target)
    print(f"[link] {target}: {n} files linked from {source.resolve()}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main)

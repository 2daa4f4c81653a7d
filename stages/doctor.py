"""Preflight: check in seconds, before any GPU time is spent, what would make a run fail.

    python -m stages.doctor          # a short table; exits 1 if anything would fail

Checks params.yaml, the base model directory, the stack's versions, the GPU when params ask for one,
the GPU memory the training setting is estimated to need (stages/memory.py) against the card,
bitsandbytes' 4-bit kernels on the device that will train, free disk for checkpoints, and git (an
author for `dvc exp run`, a first commit for DVCLive). The train stage runs the same checks first.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from stages import params as P
from stages.errors import StageError, fail
from stages.paths import llm_dir

STACK = {"torch": None, "transformers": "4.48.0", "xtuner": "0.2.0", "mmengine": "0.10.6", "peft": None,
         "bitsandbytes": "0.50.2", "deepspeed": None, "datasets": None, "dvc": None, "dvclive": None}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fatal: bool = True

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.fatal else "warn")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def check_versions() -> Check:
    found, off = [], []
    for name, pinned in STACK.items():
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            off.append(f"{name} missing")
            continue
        found.append(f"{name} {version}")
        if pinned and version.split("+")[0] != pinned:
            off.append(f"{name} {version} (tested: {pinned})")
    return Check("stack", not off, "; ".join(off) if off else ", ".join(found), fatal=False)


def check_model(p: P.Params) -> Check:
    from stages.modeldir import check

    try:
        folder = check(llm_dir(p.recipe))
    except StageError as err:
        return Check("model", False, str(err))
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return Check("model", True, f"{folder}: config, tokenizer, weights ({size / 2**30:.2f} GiB)")


def check_structure(p: P.Params, path: Path | None = None) -> Check:
    """What the model directory is (InternLM2 through its remote code, Llama, an InternVL composition),
    the attention training will run, and the layers that get LoRA; fatal when config.json's auto_map
    names code files the directory lacks (loading would fail after minutes of setup)."""
    import importlib.util

    from stages.modeldir import read_config
    from stages.structures import attention_of, lora_targets, missing_code, structure_of

    path = Path(path or llm_dir(p.recipe))
    if not (path / "config.json").is_file():
        return Check("structure", False, f"not checked: {path} has no config.json", fatal=False)
    try:
        cfg = read_config(path, str(path))
    except StageError as err:
        return Check("structure", False, str(err))
    missing = missing_code(path, cfg)
    if missing:
        return Check("structure", False, f"{path / 'config.json'}: names remote code that is not in the "
                                         f"folder: {', '.join(missing)} (copy the model's *.py files beside it)")
    llm = cfg.get("llm_config") if isinstance(cfg.get("llm_config"), dict) else cfg
    flash = importlib.util.find_spec("flash_attn") is not None
    targets = lora_targets(llm, p.lora.target_modules)
    head = f"{structure_of(cfg)} with LLM {structure_of(llm)}" if llm is not cfg else structure_of(cfg)
    return Check("structure", True, f"{head}; attention {attention_of(llm, flash)}; LoRA on "
                                    f"{', '.join(targets) if isinstance(targets, list) else targets}")


def check_device(p: P.Params) -> Check:
    import torch

    if p.train.device == "cpu":
        return Check("device", True, "cpu (train.device: cpu)")
    if not torch.cuda.is_available():
        if p.train.device == "cuda":
            return Check("device", False, "train.device: cuda, but no CUDA GPU is visible")
        return Check("device", True, "no GPU visible: training runs on the CPU (train.device: auto)")
    n = torch.cuda.device_count()
    if n < p.train.gpus:
        return Check("device", False, f"train.gpus: {p.train.gpus}, but {n} GPUs are visible")
    name = torch.cuda.get_device_name(0)
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
    from stages import fp8

    no_fp8 = fp8.check_gpu()
    detail = f"{n} x {name}, CUDA {torch.version.cuda}, {bf16}, {'no float8' if no_fp8 else 'float8'}"
    if p.train.fp8 and no_fp8:
        return Check("device", False, f"{detail}: train.fp8: true, but {no_fp8}; set train.fp8: false")
    return Check("device", True, detail)


def check_bnb(p: P.Params) -> Check:
    if p.quant.mode == "none":
        return Check("bitsandbytes", True, "not needed (quant.mode: none)")
    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch

    device = "cuda" if torch.cuda.is_available() and p.train.device != "cpu" else "cpu"
    try:
        import bitsandbytes.functional as F

        w = torch.randn(64, 64, device=device)
        packed, state = F.quantize_4bit(w, quant_type=p.quant.mode)
        err = (F.dequantize_4bit(packed, state) - w).abs().mean().item()
    except Exception as exc:  # a missing kernel library shows up as anything
        return Check("bitsandbytes", False, f"4-bit {p.quant.mode} on {device} fails: {type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''}")
    return Check("bitsandbytes", err < 0.2, f"4-bit {p.quant.mode} on {device}: round-trip error {err:.3f}")


def check_disk(p: P.Params, root: Path = Path(".")) -> Check:
    """Room for a merged copy of the base model, checkpoints and the DVC cache: about 3 x the model."""
    model = llm_dir(p.recipe)
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) if model.is_dir() else 0
    need = 3 * size + 2**30
    free = shutil.disk_usage(root).free
    return Check("disk", free >= need, f"{free / 2**30:.1f} GiB free, about {need / 2**30:.1f} GiB needed")


def check_git() -> Check:
    if not shutil.which("git") or _git("rev-parse", "--is-inside-work-tree").returncode:
        return Check("git", False, "not a git repository: `dvc repro` works, DVC experiments need one",
                     fatal=False)
    if _git("rev-parse", "-q", "--verify", "HEAD").returncode:
        return Check("git", False, "no commit yet: DVCLive records training against a commit; commit once")
    if _git("var", "GIT_AUTHOR_IDENT").returncode:
        return Check("git", False, "no git author: set git config user.name and user.email "
                                   "(`dvc exp run` commits; mmengine's DVCLive backend would even run "
                                   "`dvc init -f`)", fatal=False)
    return Check("git", True, _git("var", "GIT_AUTHOR_IDENT").stdout.rsplit(">", 1)[0] + ">")


def check_memory(p: P.Params) -> Check:
    """The setting's estimated peak against the card: fatal over the card, a warning over the budget."""
    from stages import plan

    m = plan.machine()
    if not m["cuda"] or p.train.device == "cpu":
        return Check("memory", True, "not checked: training runs on the CPU")
    try:
        r = plan.resolve_here(p, m)
    except StageError as err:
        return Check("memory", False, str(err))
    if r["estimate_gb"] is None:  # the image recipes: the estimate models the text recipe's training
        return Check("memory", True, f"not estimated for recipe {p.recipe}: micro-batch {r['micro_batch']} x "
                                     f"{r['grad_accum']} as set in train", fatal=False)
    detail = (f"micro-batch {r['micro_batch']} x {r['grad_accum']}, checkpointing {plan.checkpointing_words(r)}: "
              f"about {r['estimate_gb']} GB of {m['card_gb']:.0f} GB")
    if r["estimate_gb"] > m["card_gb"]:
        return Check("memory", False, detail + "; lower train.memory_gb or set train.micro_batch: auto")
    return Check("memory", r["estimate_gb"] <= r["memory_gb"],
                 detail + ("" if r["estimate_gb"] <= r["memory_gb"] else f", over train.memory_gb {r['memory_gb']}"),
                 fatal=False)


def run_checks(p: P.Params, skip: Sequence[str] = ()) -> list[Check]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("model", lambda: check_model(p)), ("structure", lambda: check_structure(p)), ("stack", check_versions), ("device", lambda: check_device(p)),
        ("memory", lambda: check_memory(p)),
        ("bitsandbytes", lambda: check_bnb(p)), ("disk", lambda: check_disk(p)), ("git", check_git)]
    return [fn() for name, fn in checks if name not in skip]


def print_table(checks: list[Check]) -> None:
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {c.status:<4}  {c.name:<{width}}  {c.detail}", flush=True)


def require(p: P.Params, skip: Sequence[str] = ()) -> None:
    """Fail with one line on the first fatal problem (what the train stage calls first)."""
    for c in run_checks(p, skip):
        if not c.ok and c.fatal:
            fail(f"doctor: {c.name}: {c.detail}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = P.load(args.params)
    print(f"  ok    params  {args.params} is valid", flush=True)
    checks = run_checks(params)
    print_table(checks)
    bad = [c for c in checks if not c.ok and c.fatal]
    if bad:
        fail(f"doctor: {len(bad)} check(s) would fail: {', '.join(c.name for c in bad)}")


if __name__ == "__main__":
    from stages.errors import run

    run(main)

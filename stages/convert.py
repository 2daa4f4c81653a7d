"""Stage `convert`: the trained adapter to Hugging Face format (peft, safetensors), with XTuner's
pth_to_hf from the same rendered config as training.

The adapter keeps the training precision: fp32 when training ran in fp32 (CPU), else XTuner's
fp16. `target_modules` in adapter_config.json is sorted, so the file is the same on every rerun.
Recipe llava: the same converter writes llm_adapter/, visual_encoder_adapter/ and projector/.
Recipe internvl: XTuner's pth_to_hf has no InternVL path; the trained weights (LoRA, mlp1) are checked and
saved as adapter.safetensors (stages/recipes/internvl/steps.py), and the merge stage runs convert_to_official.

    python -m stages.convert         # writes models/adapter/
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.errors import fail, note
from stages.io import output_dir, write_json
from stages.paths import ADAPTER, ADAPTER_PTH, CONFIG


LLAVA_PARTS = ("llm_adapter", "visual_encoder_adapter", "projector")


def _sort_targets(folder: Path) -> None:
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    write_json(cfg_path, cfg)


def convert_llava(config: Path, pth: Path, out: Path, fp32: bool) -> None:
    """pth_to_hf of a LLaVA fine-tune: the three parts, each checked."""
    from stages.xtuner_api import load_checkpoint_weights, pth_to_hf

    if not pth.is_file():
        fail(f"{pth}: not found; run `dvc repro train` first")
    load_checkpoint_weights(pth)
    with output_dir(out) as tmp:
        pth_to_hf(config, pth, tmp, fp32)
        missing = [part for part in LLAVA_PARTS if not (tmp / part).is_dir()]
        if missing:
            fail(f"{pth}: pth_to_hf wrote no {', '.join(missing)} (a LLaVA fine-tune with LoRA on both models "
                 "and a projector expected)")
        for part in LLAVA_PARTS[:2]:
            _sort_targets(tmp / part)


def convert(config: Path, pth: Path, out: Path, fp32: bool) -> None:
    if not pth.is_file():
        fail(f"{pth}: not found; run `dvc repro train` first")
    start = time.time()
    from stages.xtuner_api import load_checkpoint_weights, patch_stack, pth_to_hf

    patch_stack()
    import xtuner.tools.model_converters.pth_to_hf  # noqa: F401  (timed apart: most of the stage on a GPU host)

    imported = time.time()
    load_checkpoint_weights(pth)  # a damaged file is one line here, not a traceback inside pth_to_hf
    checked = time.time()
    with output_dir(out) as tmp:
        pth_to_hf(config, pth, tmp, fp32)
        note(import_s=round(imported - start, 2), check_pth_s=round(checked - imported, 2),
             pth_to_hf_s=round(time.time() - checked, 2))
        if not (tmp / "adapter_config.json").is_file() or not list(tmp.glob("*.safetensors")):
            fail(f"{pth}: pth_to_hf wrote no adapter (adapter_config.json and safetensors expected)")
        _sort_targets(tmp)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    from stages.xtuner_api import lean_imports, read_pipeline

    params = P.load(args.params)
    pipeline = read_pipeline(CONFIG)
    lean_imports(images=pipeline.get("recipe") in ("llava", "internvl"))
    if pipeline.get("recipe") == "internvl":  # stages/recipes/internvl/steps.py
        from stages.recipes.internvl import steps as internvl_recipe

        lora = params.lora
        internvl_recipe.save_adapter(ADAPTER_PTH, ADAPTER, {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout})
    elif pipeline.get("recipe") == "llava":
        convert_llava(CONFIG, ADAPTER_PTH, ADAPTER, fp32=pipeline["precision"] == "fp32")
    else:
        convert(CONFIG, ADAPTER_PTH, ADAPTER, fp32=pipeline["precision"] == "fp32")
    files = sorted(p.name for p in ADAPTER.iterdir())
    print(f"[convert] {ADAPTER}: {', '.join(files)}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="convert")

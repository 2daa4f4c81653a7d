"""Stage convert, recipe assistant: XTuner's pth_to_hf from the rendered config, with
`--safe-serialization`; the adapter keeps the training precision (fp32 when training ran in fp32)."""
from __future__ import annotations

import time
from pathlib import Path

from stages.errors import fail, note
from stages.io import output_dir
from stages.paths import ADAPTER, ADAPTER_PTH, CONFIG
from stages.xtuner_api import sort_targets


def run(p, pipeline: dict) -> None:
    convert(CONFIG, ADAPTER_PTH, ADAPTER, fp32=pipeline["precision"] == "fp32")


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
        sort_targets(tmp)

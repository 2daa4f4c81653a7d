"""The one door to XTuner: every import of xtuner goes through this module.

XTuner 0.2.0's stack needs a few fixes on these machines. Each lives here, applied at run time by
`patch_stack()` (never by editing site-packages), with a comment naming the error it prevents and a
test in tests/test_xtuner_api.py that fails without it.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from stages.errors import fail


@functools.cache
def patch_stack() -> None:
    """Apply every compatibility fix once, before xtuner is imported."""
    _torchvision_without_c_ops()


def _torchvision_without_c_ops() -> None:
    """Prevents `RuntimeError: operator torchvision::nms does not exist` on `import xtuner.dataset`.

    With CPU torch 2.13.0 pip settles on torchvision 0.28.0, whose compiled ops (`_C`) cannot load.
    torchvision then still registers fake kernels for `torchvision::nms`/`qnms`, which fails for ops
    that were never defined. Defining the two op schemas (what `_C` would define) lets the import
    succeed; image transforms work, `torchvision.ops` kernels do not (XTuner does not use them).
    Where `_C` loads (a matching GPU build), nothing is changed.
    """
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations)))
    libs = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    try:
        if libs:
            torch.ops.load_library(str(libs[0]))
            return
    except (OSError, RuntimeError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)  # a Library deregisters its ops when garbage-collected


_KEEP: list[Any] = []


def prompt_template(name: str) -> dict:
    """XTuner's prompt template `name` (for example internlm2_chat), as a plain dict."""
    patch_stack()
    from xtuner.utils import PROMPT_TEMPLATE

    if name not in PROMPT_TEMPLATE:
        close = [n for n in PROMPT_TEMPLATE if name.split("_")[0] in n][:6]
        fail(f"train.prompt_template: {name!r} is not an XTuner template "
             f"(for example: {', '.join(close or list(PROMPT_TEMPLATE)[:6])})")
    return dict(PROMPT_TEMPLATE[name])

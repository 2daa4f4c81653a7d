"""Golden files pin what the template renders for a CPU and a GPU machine.
Regenerate after a deliberate template change: UPDATE_GOLDEN=1 pytest tests/test_render.py"""
import json
import os
from dataclasses import replace

import pytest

from stages import params as P, render
from stages.errors import StageError
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "golden"
PARAMS = P.load(ROOT / "params.yaml")
MACHINES = {"cpu": dict(cuda=False, bf16=False), "gpu_bf16": dict(cuda=True, bf16=True)}


@pytest.mark.parametrize("machine", MACHINES)
def test_template_renders_the_golden_file(machine):
    resolved = render.resolve(PARAMS, **MACHINES[machine])
    text = render.render_text("assistant", render.context(PARAMS, resolved))
    golden = GOLDEN / f"assistant_{machine}.py"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")


def test_auto_resolves_per_machine():
    cpu = render.resolve(PARAMS, cuda=False, bf16=False)
    assert (cpu["device"], cpu["precision"], cpu["deepspeed"], cpu["torch_dtype"]) == ("cpu", "fp32", "none",
                                                                                         "float32")
    gpu = render.resolve(PARAMS, cuda=True, bf16=True)
    assert (gpu["device"], gpu["precision"], gpu["deepspeed"], gpu["compute_dtype"]) == ("cuda", "bf16", "zero2",
                                                                                         "bfloat16")
    old_gpu = render.resolve(PARAMS, cuda=True, bf16=False)
    assert old_gpu["precision"] == "fp16"


def test_cuda_asked_for_without_a_gpu_is_one_line():
    p = replace(PARAMS, train=replace(PARAMS.train, device="cuda"))
    with pytest.raises(StageError, match="train.device: cuda, but no CUDA GPU is visible"):
        render.resolve(p, cuda=False, bf16=False)


def test_deepspeed_json_states_precision():
    ds = render.deepspeed_config(render.resolve(PARAMS, cuda=True, bf16=True))
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_rendered_config_loads_with_mmengine(tmp_path):
    path = render.render(PARAMS, render.resolve(PARAMS, cuda=True, bf16=True), tmp_path / "config")
    cfg = render.check_config(path)
    assert cfg.model.lora.r == PARAMS.lora.r and cfg.train_dataloader.batch_size == PARAMS.train.micro_batch
    assert cfg.pipeline["deepspeed_config"] == "deepspeed.json"
    assert json.loads((tmp_path / "config" / "deepspeed.json").read_text())["bf16"]["enabled"]
    text = path.read_text(encoding="utf-8")
    assert "os.environ" not in text and text.startswith("# Rendered by `dvc repro render`")


def test_every_tuned_value_reaches_the_config():
    p = replace(PARAMS, lora=replace(PARAMS.lora, r=8, alpha=32.0, target_modules=["q_proj", "v_proj"]),
                train=replace(PARAMS.train, lr=3e-4, max_iters=77, warmup_iters=3, micro_batch=2, grad_accum=4))
    text = render.render_text("assistant", render.context(p, render.resolve(p, cuda=False, bf16=False)))
    for needle in ("r=8,", "lora_alpha=32.0", "target_modules=['q_proj', 'v_proj']", "lr = 0.0003",
                   "max_iters=77", "warmup_iters = 3", "batch_size = 2", "accumulative_counts = 4",
                   "end=77"):
        assert needle in text, needle


def test_mmengine_dvclive_backend_is_never_configured():
    # mmengine's DVCLiveVisBackend runs `dvc init -f` (wiping .dvc/) when git has no author.
    for golden in GOLDEN.glob("*.py"):
        text = golden.read_text(encoding="utf-8")
        assert "DVCLive" not in text.replace("DVCLive plots", "").replace("DVCLive backend is not used", "")
        assert "vis_backends=[dict(type=LocalVisBackend)]" in text

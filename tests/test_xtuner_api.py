import subprocess
import sys

import pytest

from stages.xtuner_api import patch_stack
from tests.conftest import ROOT, env

IMPORT = "import xtuner.dataset, torchvision.transforms; print('imported')"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT)


def torchvision_ops_load() -> bool:
    return python("import torch, torchvision; torch.ops.torchvision.nms").returncode == 0


def test_xtuner_imports_after_patch_stack():
    proc = python("from stages.xtuner_api import patch_stack; patch_stack(); " + IMPORT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported" in proc.stdout


@pytest.mark.skipif(torchvision_ops_load(), reason="this torchvision's compiled ops load: nothing to fix")
def test_without_the_fix_xtuner_does_not_import():
    proc = python(IMPORT)
    assert proc.returncode != 0
    assert "operator torchvision::nms does not exist" in proc.stderr


def test_patch_is_idempotent_and_keeps_transforms_working():
    proc = python("from stages.xtuner_api import patch_stack; patch_stack(); patch_stack(); "
                  "from PIL import Image; from torchvision import transforms; "
                  "t = transforms.Compose([transforms.Resize(8), transforms.ToTensor()]); "
                  "print(tuple(t(Image.new('RGB', (16, 16))).shape))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(3, 8, 8)" in proc.stdout


def test_prompt_template_known_and_unknown():
    from stages.errors import StageError
    from stages.xtuner_api import prompt_template

    assert prompt_template("internlm2_chat")["SUFFIX"] == "<|im_end|>"
    with pytest.raises(StageError, match="train.prompt_template: 'nope' is not an XTuner template"):
        prompt_template("nope")


BNB = ("import transformers.integrations as i; print(i.validate_bnb_backend_availability(raise_exception=True))")


def test_bnb_backend_check_passes_after_patch():
    proc = python("from stages.xtuner_api import patch_stack; patch_stack(); " + BNB)
    assert proc.returncode == 0 and "True" in proc.stdout, proc.stderr[-2000:]


def test_without_the_bnb_fix_the_check_trips():
    proc = python(BNB)
    if proc.returncode == 0:
        pytest.skip("this transformers/bitsandbytes pair needs no fix")
    assert "'frozenset' object has no attribute 'discard'" in proc.stderr


def test_torch_cpu_bf16_query_exists_after_patch():
    code = "import torch; print(torch.cpu.is_bf16_supported())"
    assert python("from stages.xtuner_api import patch_stack; patch_stack(); " + code).stdout.strip() == "False"
    without = python(code)
    if without.returncode == 0:
        pytest.skip("this torch has torch.cpu.is_bf16_supported")
    assert "has no attribute 'is_bf16_supported'" in without.stderr


def test_mmengine_checkpoints_load_only_with_the_weights_only_fix(built):
    ckpt = sorted((built / "models/work").glob("iter_*.pth"))[-1]
    code = f"import torch; torch.load({str(ckpt)!r}, map_location='cpu'); print('loaded')"
    fixed = python("from stages.xtuner_api import patch_stack; patch_stack(); import stages.paths; " + code)
    assert "loaded" in fixed.stdout, fixed.stderr[-2000:]
    without = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                             env={k: v for k, v in env().items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"})
    assert without.returncode != 0 and "Weights only load failed" in without.stderr


def _input_grad_after_eval_pass() -> float:
    """|d out / d x| of a 4-bit layer that first ran once in eval mode without grad, as XTuner's
    chat hook does before training."""
    import torch
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(64, 64)})
    layer = layer.to("cpu")
    with torch.no_grad():
        layer.eval()(torch.randn(1, 64))
    x = torch.randn(3, 64, requires_grad=True)
    layer.train()(x).sum().backward()
    return x.grad.abs().sum().item() if x.grad is not None else 0.0


def test_gradients_flow_through_4bit_layers_after_an_eval_pass():
    patch_stack()
    assert _input_grad_after_eval_pass() > 0


def test_without_the_packing_fix_gradients_vanish(monkeypatch):
    import bitsandbytes.nn.modules as modules
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks")
    monkeypatch.setattr(modules, "has_avx512bf16", has_avx512bf16)
    assert _input_grad_after_eval_pass() == 0


CONVERT = """
import json, sys
from pathlib import Path
from stages import xtuner_api
if sys.argv[1] == "ours":
    xtuner_api.lean_imports()  # as the convert stage runs it
xtuner_api.patch_stack()
from xtuner.tools.model_converters import pth_to_hf as tool
built = []
real_init = tool.init_empty_weights
def init_empty_weights(*a, **k):  # the tool's meta-device path, observed (it runs as it would)
    built.append("meta")
    return real_init(*a, **k)
tool.init_empty_weights = init_empty_weights
out = Path(sys.argv[2])
if sys.argv[1] == "tool":
    sys.argv = ["pth_to_hf", "models/config/xtuner_config.py", "models/adapter.pth", str(out), "--safe-serialization"]
    tool.main()
else:
    xtuner_api.pth_to_hf(Path("models/config/xtuner_config.py"), Path("models/adapter.pth"), out, fp32=False)
cfg = json.loads((out / "adapter_config.json").read_text())
print(json.dumps({"meta": bool(built), "targets": sorted(cfg["target_modules"]),
                  "bnb": sys.modules.get("bitsandbytes") is not None}))
"""


def test_convert_skips_the_quantized_base_and_writes_the_same_adapter(built, tmp_path):
    """pth_to_hf without the LLM's quantization_config takes XTuner's meta-device path (no base weight is
    read or quantized) and writes the adapter the unchanged tool writes, byte for byte."""
    import json

    results = {}
    for how in ("tool", "ours"):
        proc = subprocess.run([sys.executable, "-c", CONVERT, how, str(tmp_path / how)], capture_output=True,
                              text=True, env=env(), cwd=built)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[how] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["tool"]["meta"] is False and results["ours"]["meta"] is True  # the tool's own choice
    assert results["tool"]["targets"] == results["ours"]["targets"]
    assert results["tool"]["bnb"] and not results["ours"]["bnb"]  # lean_imports: no bitsandbytes loaded
    ours, tools = tmp_path / "ours" / "adapter_model.safetensors", tmp_path / "tool" / "adapter_model.safetensors"
    assert ours.read_bytes() == tools.read_bytes()


@pytest.mark.parametrize("images", [False, True])
def test_lean_imports_keep_peft_transformers_and_xtuner_working_without_bnb_and_deepspeed(images):
    proc = python(f"from stages.xtuner_api import lean_imports, patch_stack; lean_imports(images={images}); "
                  "patch_stack(); from peft import PeftModel; from transformers import AutoModelForCausalLM; "
                  "from xtuner.tools.model_converters import pth_to_hf, merge; import sys; "
                  "print([sys.modules.get(m) is None for m in ('bitsandbytes', 'deepspeed', 'sklearn', 'torchvision')])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"[True, True, True, {not images}]"

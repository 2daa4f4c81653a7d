import subprocess
import sys

import pytest

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

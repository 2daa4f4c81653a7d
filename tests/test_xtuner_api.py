import os
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


# a datasets `map` over two processes after XTuner's import, as the train stage's on a GPU host (map_num_proc 8)
FORKED_MAP = ("import datasets; datasets.Dataset.from_dict({'a': [1, 2, 3, 4]}).map(lambda r: r, num_proc=2); "
              "import os; print(os.environ['TOKENIZERS_PARALLELISM'])")


def test_xtuner_imports_after_patch_stack():
    """...and leaves TOKENIZERS_PARALLELISM as it was: XTuner's import set it to "true", and each datasets `map`
    over several processes then printed a line on the terminal (8 lines a train stage on the GPU machine)."""
    proc = python("import os; os.environ['TOKENIZERS_PARALLELISM'] = 'false'; "
                  "from stages.xtuner_api import patch_stack; patch_stack(); " + IMPORT + "; " + FORKED_MAP)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["imported", "false"], proc.stdout + proc.stderr[-2000:]
    assert "Setting TOKENIZERS_PARALLELISM" not in proc.stderr, proc.stderr[-2000:]


def test_xtuner_still_turns_tokenizers_parallelism_on_at_import():
    """What `_tokenizers_parallelism_kept` undoes is still in the installed XTuner (read, not imported)."""
    import importlib.util
    from pathlib import Path

    source = Path(importlib.util.find_spec("xtuner").origin).parent / "dataset" / "internvl_dataset.py"
    assert 'os.environ["TOKENIZERS_PARALLELISM"] = "true"' in source.read_text()
    proc = python("import os; os.environ['TOKENIZERS_PARALLELISM'] = 'true'; " + FORKED_MAP)  # what it caused
    assert proc.returncode == 0 and "Setting TOKENIZERS_PARALLELISM=false for forked processes" in proc.stderr, \
        proc.stderr[-2000:]


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


def test_prompt_templates_are_xtuners_without_importing_its_package():
    proc = python("import sys; from stages.xtuner_api import prompt_templates; t = prompt_templates(); "
                  "print('xtuner' in sys.modules); from stages.xtuner_api import patch_stack; patch_stack(); "
                  "from xtuner.utils import PROMPT_TEMPLATE; print(t == PROMPT_TEMPLATE)")
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "True"], proc.stderr[-2000:]


def test_after_import_fixes_a_module_at_its_first_import_or_at_once(tmp_path, monkeypatch):
    from stages.xtuner_api import after_import

    (tmp_path / "pipeline_probe_late.py").write_text("value = 1\n")
    (tmp_path / "pipeline_probe_early.py").write_text("value = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    after_import("pipeline_probe_late", lambda m: seen.append(("late", m.value)))
    assert seen == []  # not imported yet: nothing runs
    import pipeline_probe_early  # noqa: F401

    after_import("pipeline_probe_early", lambda m: seen.append(("early", m.value)))
    import pipeline_probe_late  # noqa: F401

    assert seen == [("early", 1), ("late", 1)]
    monkeypatch.setitem(sys.modules, "pipeline_probe_hidden", None)  # lean_imports' way of hiding a package
    after_import("pipeline_probe_hidden", lambda m: seen.append(("hidden", m)))
    assert seen == [("early", 1), ("late", 1)]
    for name in ("pipeline_probe_late", "pipeline_probe_early"):
        sys.modules.pop(name, None)


def test_patch_stack_imports_neither_bitsandbytes_nor_transformers_integrations():
    proc = python("import sys; from stages.xtuner_api import patch_stack; patch_stack(); "
                  "print([m for m in ('bitsandbytes', 'transformers.integrations.bitsandbytes') if m in sys.modules])")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


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


class RunsCode:
    """Unpickles as a call to exec that writes `marker`: what a crafted .pth does on the GPU host."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def crafted_pth(path, marker):
    """A projector checkpoint that would run code when fully unpickled."""
    import torch

    torch.save({"state_dict": {"projector.model.0.weight": torch.zeros(2, 2)}, "meta": RunsCode(marker)}, path)
    return path


def mmengine_like_checkpoint(path):
    """What mmengine's checkpoints hold beyond tensors: numpy values in `meta`, HistoryBuffers in the
    message hub (pickled with `getattr(HistoryBuffer, 'min')` and numpy arrays)."""
    import numpy as np
    import torch
    from mmengine.logging import HistoryBuffer

    loss = HistoryBuffer()
    loss.update(2.5)
    loss.update(np.float64(1.5))
    torch.save({"meta": {"seed": np.int64(7), "epoch": 1}, "message_hub": {"log_scalars": {"train/loss": loss}},
                "state_dict": {"w": torch.arange(4.0)}}, path)
    return path


def test_a_pth_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path):
    import pickle

    import torch

    from stages.errors import StageError
    from stages.xtuner_api import load_checkpoint_weights, weights_only_loads

    marker = tmp_path / "ran"
    pth = crafted_pth(tmp_path / "iter_2181.pth", marker)
    with pytest.raises(StageError) as err:
        load_checkpoint_weights(pth, "llava.pretrained_pth")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"llava.pretrained_pth: {pth}: refused: ")
    assert "builtins.exec" in message and "nothing in it ran" in message
    assert not marker.exists()
    # XTuner's own loader asks for weights_only=False; in the block it reads weights only all the same
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(pth, weights_only=False)
    assert not marker.exists()
    torch.load(pth, weights_only=False)  # the control: unpickled fully, the payload runs
    assert marker.read_text() == "ran"


def test_the_allowed_getattr_fetches_only_history_buffer_statistics(tmp_path):
    """mmengine pickles HistoryBuffer's statistics as getattr(HistoryBuffer, 'min'); the getattr allowed
    under that name fetches those and nothing else."""
    import pickle

    import torch
    from mmengine.logging import HistoryBuffer

    from stages.xtuner_api import weights_only_loads

    class Fetch:
        def __reduce__(self):
            return getattr, (HistoryBuffer, "__init__")

    torch.save({"x": Fetch()}, tmp_path / "fetch.pth")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(tmp_path / "fetch.pth")


def test_mmengine_checkpoints_load_with_weights_only_and_the_allowed_globals(tmp_path):
    import pickle

    import torch

    from stages.xtuner_api import load_checkpoint_weights, weights_only_loads

    pth = mmengine_like_checkpoint(tmp_path / "iter_10.pth")
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|numpy"):
        torch.load(pth, weights_only=True)  # torch's own allow-list is not enough
    with weights_only_loads():
        ckpt = torch.load(pth, weights_only=False)
    assert ckpt["meta"]["seed"] == 7 and ckpt["message_hub"]["log_scalars"]["train/loss"].mean() == 2.0
    assert torch.equal(load_checkpoint_weights(pth)["w"], torch.arange(4.0))


def test_the_pipelines_own_checkpoint_loads_with_weights_only_and_resumes_only_with_full_unpickling(built):
    """A real checkpoint of the trainer (models/work/): its weights load with weights only; torch's
    default (weights only, torch's globals) refuses it, which is why the trainer's resume unpickles fully."""
    import pickle

    import torch

    from stages.xtuner_api import full_unpickling, load_checkpoint_weights

    ckpt = sorted((built / "models/work").glob("iter_*.pth"))[-1]
    weights = load_checkpoint_weights(ckpt)
    assert weights and all("lora_" in k for k in weights)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(ckpt, map_location="cpu")
    with full_unpickling():
        assert torch.load(ckpt, map_location="cpu")["meta"]["iter"] > 0


@pytest.mark.parametrize("resume", [False, True])
def test_run_trainer_unpickles_fully_only_to_resume(tmp_path, monkeypatch, resume):
    """XTuner's trainer runs under weights-only loading (its pretrained_pth load included), except a resume
    from the pipeline's own checkpoint; afterwards the process is as before."""
    import pickle

    import torch

    from stages import xtuner_api

    marker = tmp_path / "ran"
    pth = crafted_pth(tmp_path / "projector.pth", marker)
    seen = {}

    def trainer(module, prog, argv, quiet=True):
        seen["argv"] = argv
        seen["env"] = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
        if not resume:  # as XTuner's guess_load_checkpoint loads the config's pretrained_pth
            with pytest.raises(pickle.UnpicklingError):
                torch.load(pth, map_location="cpu", weights_only=False)

    monkeypatch.setattr(xtuner_api, "run_tool", trainer)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    xtuner_api.run_trainer(tmp_path / "cfg.py", tmp_path / "work", None, tmp_path / "iter_50.pth" if resume else None)
    assert ("--resume" in seen["argv"]) == resume
    assert seen["env"] == ({"TORCH_FORCE_WEIGHTS_ONLY_LOAD": None, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if resume
                           else {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": None})
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    assert not marker.exists()


DIST = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("launcher", ["none", "pytorch"])
def test_deepspeed_in_one_process_gets_its_rank_from_the_environment(tmp_path, monkeypatch, launcher):
    """One process with DeepSpeed and no launcher: the trainer starts with rank 0 of 1 and a free local
    port in the environment (else DeepSpeed asks MPI); a launcher's own values are never touched."""
    from stages import xtuner_api

    seen = {}
    monkeypatch.setattr(xtuner_api, "run_tool", lambda module, prog, argv, quiet=True: seen.update(
        argv=argv, env={k: os.environ.get(k) for k in DIST}))
    for key in DIST:
        monkeypatch.setenv(key, "x")  # recorded, so that the test leaves the environment as it found it
        monkeypatch.delenv(key)
    xtuner_api.run_trainer(tmp_path / "cfg.py", tmp_path / "work", tmp_path / "deepspeed.json", None, launcher)
    assert seen["argv"][-2:] == ["--deepspeed", str(tmp_path / "deepspeed.json")]
    if launcher == "pytorch":
        assert seen["env"] == dict.fromkeys(DIST)
        return
    env_seen = seen["env"]
    assert {k: env_seen[k] for k in DIST[:4]} == {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                 "MASTER_ADDR": "127.0.0.1"}
    assert 1024 <= int(env_seen["MASTER_PORT"]) < 65536
    monkeypatch.setenv("MASTER_PORT", "29555")  # set by the user: kept
    xtuner_api.run_trainer(tmp_path / "cfg.py", tmp_path / "work", tmp_path / "deepspeed.json", None, launcher)
    assert seen["env"]["MASTER_PORT"] == "29555"


BNB_KERNEL_WARNING = ("import sys, importlib, bitsandbytes.functional as F; sys.modules['kernels'] = None; "
                      "F.has_avx512bf16 = lambda: True; importlib.reload(sys.modules['bitsandbytes.backends.cpu.ops'])")


def test_bitsandbytes_hub_kernel_warning_is_silenced():
    """On a CPU with AVX512-BF16, bitsandbytes tries to fetch a kernel from a hub at import and logs a
    warning when it cannot (offline); its own kernels are used. Simulated here on any CPU: the kernel
    check answers yes and the `kernels` package is missing."""
    fixed = python("from stages.xtuner_api import patch_stack; patch_stack(); " + BNB_KERNEL_WARNING)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "Failed to load CPU gemm_4bit_forward" not in fixed.stderr
    without = python(BNB_KERNEL_WARNING)
    assert without.returncode == 0 and "Failed to load CPU gemm_4bit_forward" in without.stderr


BNB_IMPORT = ("import sys, torch; compile_before = torch.compile; import bitsandbytes, bitsandbytes.functional as F; "
              "w = torch.randn(64, 64); packed, state = F.quantize_4bit(w, quant_type='nf4'); "
              "assert F.dequantize_4bit(packed, state).shape == w.shape and torch.compile is compile_before; "
              "print('inductor' if 'torch._inductor.compile_fx' in sys.modules else 'no inductor')")


def test_bitsandbytes_import_leaves_its_torch_compile_to_the_first_call():
    """bitsandbytes' import called torch.compile on four fallback ops, which imported Inductor in every
    process that loads a 4-bit model (1.1-1.2 s of each CPU train stage's start); now the first call compiles."""
    fixed = python("from stages.xtuner_api import patch_stack; patch_stack(); " + BNB_IMPORT)
    assert fixed.returncode == 0 and fixed.stdout.split() == ["no", "inductor"], fixed.stderr[-2000:]
    without = python(BNB_IMPORT)
    assert without.returncode == 0 and without.stdout.split() == ["inductor"], without.stderr[-2000:]


EXIT_FREEZE = ("import atexit, gc, sys; atexit.register(lambda: print(gc.get_freeze_count())); "  # runs after the stage's
             "import stages.errors, torch")                                                        # handlers (last in, first out)


def test_a_stage_process_skips_the_last_garbage_collection_at_exit():
    """Python's last collections at exit walked every object of the stack a stage imported: 1.0-1.4 s of CPU after
    each stage was done (a 6-iteration CPU train stage 10.2-11.3 -> 8.4-8.9 s, evaluate 5.1-5.5 -> 4.1-4.5 s).
    stages.errors freezes them after the other exit handlers have run."""
    frozen = python(EXIT_FREEZE)
    assert frozen.returncode == 0 and int(frozen.stdout) > 100_000, frozen.stderr[-2000:]  # torch's objects
    without = python(EXIT_FREEZE.replace("stages.errors, ", ""))
    assert without.returncode == 0 and int(without.stdout) == 0, without.stderr[-2000:]


START_THEN_SETTLE = ("import gc; from stages import errors; "
                     "errors.run(lambda argv: print(gc.get_threshold()[0], gc.get_freeze_count()), ARGV); "
                     "errors.settle(); print(gc.get_threshold()[0], gc.get_freeze_count() > 0)")


def test_a_stage_process_collects_rarely_while_it_imports_then_as_python_does():
    """A stage's process (stages.errors.run as its entry point) collects its youngest garbage every 100,000 new
    objects while it imports its stack, then settle() freezes what the imports made and puts Python's own
    thresholds back (the stages call it before a model loads or the trainer starts). A stage main run from a
    test (argv given) leaves the thresholds alone."""
    entry = python(START_THEN_SETTLE.replace("ARGV", "None"))
    assert entry.returncode == 0 and entry.stdout.split() == ["100000", "0", "700", "True"], entry.stderr[-2000:]
    in_test = python(START_THEN_SETTLE.replace("ARGV", "[]"))
    assert in_test.returncode == 0 and in_test.stdout.split() == ["700", "0", "700", "False"], in_test.stderr[-2000:]


def test_compile_on_first_call_compiles_once_the_same_way(monkeypatch):
    import torch

    from stages import xtuner_api

    calls = []

    def compile_now(fn, **options):
        calls.append(options)
        return lambda *args: fn(*args) + 1  # a "compiled" function that can be told apart

    monkeypatch.setattr(torch, "compile", compile_now)
    with xtuner_api._compile_on_first_call():
        later = torch.compile(lambda x: x * 2, dynamic=False)
        decorated = torch.compile(dynamic=True)(lambda x: x)
    assert torch.compile is compile_now and calls == []
    assert (later(3), later(3), decorated(5)) == (7, 7, 6)
    assert calls == [{"dynamic": False}, {"dynamic": True}]


@pytest.mark.parametrize("amp", [True, False])
def test_chat_hook_generates_inside_the_trainers_autocast(monkeypatch, amp):
    """XTuner's EvaluateChatHook chats outside the autocast training runs in; with mmengine's AMP wrapper
    (cast_dtype set) it now generates inside it, in that dtype; without AMP exactly as before."""
    import types

    import torch

    from stages import xtuner_api

    patch_stack()
    from xtuner.engine.hooks import EvaluateChatHook

    seen = []

    def generate(self, runner, *args, **kwargs):  # XTuner's, observed
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), args, kwargs))
        return "answers"

    monkeypatch.setattr(EvaluateChatHook, "_generate_samples", generate)
    xtuner_api._chat_hook_under_amp()
    wrapper = types.SimpleNamespace(cast_dtype=torch.bfloat16) if amp else types.SimpleNamespace()
    runner = types.SimpleNamespace(optim_wrapper=wrapper)
    assert EvaluateChatHook._generate_samples(object.__new__(EvaluateChatHook), runner, 5, k=1) == "answers"
    enabled, dtype, args, kwargs = seen[0]
    assert (args, kwargs) == ((5,), {"k": 1})
    assert enabled == amp and (dtype == torch.bfloat16 or not amp)
    assert not torch.is_autocast_enabled("cpu")


def test_chat_hook_leaves_the_training_randomness_alone_and_chats_at_its_interval(monkeypatch):
    """XTuner's EvaluateChatHook samples from torch's global random generator at every checkpoint and chat
    interval; LoRA dropout draws from it too. Without the state put back, the trained weights depended on
    train.save_interval and eval.interval."""
    import types

    import torch

    from stages import xtuner_api

    patch_stack()
    from xtuner.engine.hooks import EvaluateChatHook

    def generate(self, runner, *args, **kwargs):  # sampling, as XTuner's chat does
        return torch.rand(3)

    monkeypatch.setattr(EvaluateChatHook, "_generate_samples", generate)
    xtuner_api._chat_hook_under_amp()
    runner = types.SimpleNamespace(optim_wrapper=types.SimpleNamespace())
    before = torch.get_rng_state()
    EvaluateChatHook._generate_samples(object.__new__(EvaluateChatHook), runner)
    assert torch.equal(torch.get_rng_state(), before)
    # and it chats every eval.interval only, not at every checkpoint too (select scores those)
    assert EvaluateChatHook._is_save_checkpoint(object.__new__(EvaluateChatHook), runner) is False


class _Loader(list):
    """What mmengine's infinite iterator reads of a data loader: iteration and `num_workers`."""

    def __init__(self, items, num_workers):
        super().__init__(items)
        self.num_workers = num_workers


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_turns_without_mmengines_pause_unless_worker_processes_load_the_data(monkeypatch, workers):
    """mmengine sleeps 2 s at every epoch's turn (against a deadlock of restarting worker processes); the
    rendered configs load data in the training process, so the pause was dead time there, and only there."""
    import time

    from stages import xtuner_api

    patch_stack()
    xtuner_api.after_import("mmengine.runner.loops", xtuner_api._epoch_turn_without_pause)
    from mmengine.runner import loops

    pauses = []
    monkeypatch.setattr(time, "sleep", pauses.append)
    batches = loops._InfiniteDataloaderIterator(_Loader([[0, 1], [2]], workers))
    assert [next(batches) for _ in range(5)] == [[0, 1], [2], [0, 1], [2], [0, 1]]  # two turns
    assert pauses == ([] if workers == 0 else [2, 2])


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
    """With images, XTuner's image helpers too (the image recipes' merge and evaluate read images with them; they
    import scipy through scikit-image), and the transformers loss that imports scipy where it is found."""
    images_too = "from xtuner.dataset.utils import expand2square, load_image; " if images else ""
    proc = python(f"from stages.xtuner_api import lean_imports, patch_stack; lean_imports(images={images}); "
                  "patch_stack(); from peft import PeftModel; from transformers import AutoModelForCausalLM; "
                  "from transformers.loss.loss_utils import LOSS_MAPPING; "
                  f"from xtuner.tools.model_converters import pth_to_hf, merge; {images_too}import sys; "
                  "print([sys.modules.get(m) is None for m in ('bitsandbytes', 'deepspeed', 'sklearn', 'torchvision', "
                  "'scipy', 'torch.distributed.optim')])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"[True, True, True, {not images}, {not images}, True]"


def test_lean_imports_import_no_torch_until_einops_is_imported():
    """select reading back kept scores loads no model: the lean process imports no torch (1.3 s of its 3 s on the
    CPU). einops' torch backend is still found first once einops is imported, as InternLM2's attention needs."""
    proc = python("import sys; from stages.xtuner_api import lean_imports; lean_imports(images=False); "
                  "before = 'torch' in sys.modules; import einops; from einops import _backends; "
                  "print(before, 'torch' in sys.modules, [type(b).__name__ for b in _backends._loaded_backends.values()])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False True ['TorchBackend']"

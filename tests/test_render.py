"""Golden files pin what the template renders for a CPU and a GPU machine.
Regenerate after a deliberate template change: UPDATE_GOLDEN=1 pytest tests/test_render.py"""
import json
import os
from dataclasses import replace

import pytest

from stages import memory, params as P, plan, render
from stages.recipes.assistant import config as assistant_config
from stages.errors import StageError
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "golden"
PARAMS = P.load(ROOT / "params.yaml")
# InternLM2-1.8B's shape, as stages.memory reads it from config.json
SHAPE_1_8B = {"hidden": 2048, "layers": 24, "intermediate": 8192, "vocab": 92544, "kv": 1024,
              "arch": "InternLM2ForCausalLM"}
H100 = dict(cuda=True, bf16=True, card_gb=85.0, shape=SHAPE_1_8B)
MACHINES = {"cpu": dict(cuda=False, bf16=False, shape={"arch": "InternLM2ForCausalLM"}), "gpu_bf16": H100}


@pytest.mark.parametrize("machine", MACHINES)
def test_template_renders_the_golden_file(machine):
    resolved = plan.resolve(PARAMS, **MACHINES[machine])
    text = assistant_config.text(PARAMS, resolved)
    golden = GOLDEN / f"assistant_{machine}.py"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")


def test_auto_resolves_per_machine():
    cpu = plan.resolve(PARAMS, cuda=False, bf16=False)
    assert (cpu["device"], cpu["precision"], cpu["deepspeed"], cpu["torch_dtype"]) == ("cpu", "fp32", "none",
                                                                                         "float32")
    gpu = plan.resolve(PARAMS, **H100)
    assert (gpu["device"], gpu["precision"], gpu["deepspeed"], gpu["compute_dtype"]) == ("cuda", "bf16", "none",
                                                                                         "bfloat16")
    assert gpu["compile_layers"] and not cpu["compile_layers"]
    two = plan.resolve(replace(PARAMS, train=replace(PARAMS.train, gpus=2, global_batch=2)), **H100)
    assert two["deepspeed"] == "zero2" and not two["compile_layers"]
    old_gpu = plan.resolve(PARAMS, **{**H100, "bf16": False})
    assert old_gpu["precision"] == "fp16"


@pytest.mark.parametrize("budget, micro, ckpt, layers", [
    (80, 8, False, None), (40, 4, False, None), (24, 4, True, 6), (8, 4, True, 21), (6, 4, True, 23)])
def test_memory_budget_chooses_micro_batch_and_checkpointing(budget, micro, ckpt, layers):
    """The global batch stays 16 sequences; the budget decides how they are split: micro-batches of
    at least 8k tokens, as few checkpointed layers as fit (of 24), then the largest micro-batch."""
    p = replace(PARAMS, data=replace(PARAMS.data, max_length=2048),
                train=replace(PARAMS.train, global_batch=16, memory_gb=float(budget)))
    r = plan.resolve(p, **H100)
    assert (r["micro_batch"], r["checkpointing"], r["checkpoint_layers"]) == (micro, ckpt, layers)
    assert r["micro_batch"] * r["grad_accum"] == 16 and r["estimate_gb"] <= budget


def test_memory_estimate_matches_the_h100_measurements():
    """Peaks PyTorch reserved on an H100 (benchmarks/results/h100.json), 1.8B shape (Llama structure),
    bf16, nf4, LoRA r=64, fused loss, frozen weights in bf16: the estimate is within 0.5 GB."""
    setting = dict(quant="nf4", compute_bytes=2, lora_r=64, upcast_frozen=False, fused_loss=True, optimizer="adamw")
    llama = {**SHAPE_1_8B, "arch": "LlamaForCausalLM"}
    for micro, ckpt, measured in ((8, True, 7.81), (16, True, 12.33), (2, False, 18.48), (4, False, 32.77)):
        est = memory.estimate(llama, tokens=micro * 2048, checkpointing=ckpt, **setting) / memory.GB
        assert abs(est - measured) < 0.5, (micro, ckpt, est, measured)


SHAPE_7B = {"hidden": 4096, "layers": 32, "intermediate": 14336, "vocab": 92544, "kv": 1024}


@pytest.mark.parametrize("shape, arch, setting, measured", [
    (SHAPE_1_8B, "InternLM2ForCausalLM", dict(micro=16, optimizer="adamw", budget=24), 11.62),
    (SHAPE_1_8B, "LlamaForCausalLM", dict(micro=16, optimizer="adamw", budget=24), 12.02),
    (SHAPE_7B, "InternLM2ForCausalLM", dict(micro=1, optimizer="paged_adamw8bit", budget=8), 7.65),
    (SHAPE_7B, "LlamaForCausalLM", dict(micro=1, optimizer="paged_adamw8bit", budget=8), 7.82),
])
def test_memory_estimate_within_ten_percent_of_each_structure(shape, arch, setting, measured):
    """Peaks of the train stage on one H200 (benchmarks/results/structures/), checkpointing, fused
    loss, frozen bf16, LoRA r=64 on the blocks' linear layers: InternLM2's fused `wqkv` carries one
    adapter where Llama's q, k, v carry three, and paged 8-bit states sit outside PyTorch's count."""
    targets = plan.lora_targets({"architectures": [arch]}, "all-linear")
    est = memory.estimate({**shape, "arch": arch}, tokens=setting["micro"] * 2048, checkpointing=True, quant="nf4",
                          compute_bytes=2, lora_r=64, optimizer=setting["optimizer"], upcast_frozen=False,
                          fused_loss=True, loss_chunk=memory.loss_chunk_bytes(setting["budget"]),
                          targets=targets) / memory.GB
    assert measured <= est <= 1.1 * measured, (arch, est, measured)


@pytest.mark.parametrize("micro, layers, measured", [(4, 0, 20.08), (4, 8, 14.57), (16, 24, 11.25)])
def test_memory_estimate_without_dropout_within_ten_percent(micro, layers, measured):
    """Peaks of the train stage on one H200 (benchmarks/results/speed/), InternLM2 structure, LoRA r 64
    with dropout 0 (the peers' setting), fused loss, frozen bf16: no checkpointing, the first 8 of
    24 layers checkpointed, all of them."""
    arch = "InternLM2ForCausalLM"
    est = memory.estimate({**SHAPE_1_8B, "arch": arch}, tokens=micro * 2048, checkpointing=layers > 0,
                          checkpointed=layers, quant="nf4", compute_bytes=2, lora_r=64, optimizer="adamw",
                          upcast_frozen=False, fused_loss=True, targets=plan.lora_targets({"architectures": [arch]},
                                                                                          "all-linear"),
                          dropout=0.0) / memory.GB
    assert measured <= est <= 1.1 * measured, (micro, layers, est, measured)


def test_without_dropout_24_gb_trains_without_checkpointing():
    """The peers' LoRA (dropout 0) at 24 GB: micro-batch 4 with no layer checkpointed (20.1 GB measured)."""
    p = replace(PARAMS, data=replace(PARAMS.data, max_length=2048), lora=replace(PARAMS.lora, dropout=0.0),
                train=replace(PARAMS.train, global_batch=16, memory_gb=24.0))
    r = plan.resolve(p, **H100)
    assert (r["micro_batch"], r["checkpointing"], r["checkpoint_layers"]) == (4, False, None)


def test_global_batch_that_cannot_be_split_is_one_line():
    problems = P._contradictions(replace(PARAMS, train=replace(PARAMS.train, global_batch=16, micro_batch=3)))
    assert problems == ["train.global_batch: 16 is not a multiple of micro_batch x gpus (3 x 1)"]


def test_cuda_asked_for_without_a_gpu_is_one_line():
    p = replace(PARAMS, train=replace(PARAMS.train, device="cuda"))
    with pytest.raises(StageError, match="train.device: cuda, but no CUDA GPU is visible"):
        plan.resolve(p, cuda=False, bf16=False)


def test_deepspeed_json_states_precision():
    ds = plan.deepspeed_config(plan.resolve(replace(PARAMS, train=replace(PARAMS.train, deepspeed="zero2")),
                                                **H100))
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_rendered_config_loads_with_mmengine(tmp_path):
    p = replace(PARAMS, train=replace(PARAMS.train, deepspeed="zero2"))
    path = render.render(p, plan.resolve(p, **H100), tmp_path / "config")
    cfg = plan.check_config(path)
    assert cfg.model.lora.r == PARAMS.lora.r and cfg.train_dataloader.batch_size == cfg.pipeline["micro_batch"]
    assert cfg.pipeline["deepspeed_config"] == "deepspeed.json"
    assert json.loads((tmp_path / "config" / "deepspeed.json").read_text())["bf16"]["enabled"]
    text = path.read_text(encoding="utf-8")
    assert "os.environ" not in text and text.startswith("# Rendered by `dvc repro render`")


def test_every_tuned_value_reaches_the_config():
    p = replace(PARAMS, lora=replace(PARAMS.lora, r=8, alpha=32.0, target_modules=["q_proj", "v_proj"]),
                train=replace(PARAMS.train, lr=3e-4, max_iters=77, warmup_iters=3, micro_batch=2, global_batch=8))
    text = assistant_config.text(p, plan.resolve(p, cuda=False, bf16=False))
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


def test_fixed_checkpointing_is_all_layers_or_none():
    p = replace(PARAMS, data=replace(PARAMS.data, max_length=2048),
                train=replace(PARAMS.train, global_batch=16, memory_gb=24.0, activation_checkpointing=True))
    r = plan.resolve(p, **H100)
    assert (r["micro_batch"], r["checkpointing"], r["checkpoint_layers"]) == (16, True, None)
    off = plan.resolve(replace(p, train=replace(p.train, activation_checkpointing=False)), **H100)
    assert (off["checkpointing"], off["checkpoint_layers"]) == (False, None) and off["micro_batch"] == 2


@pytest.mark.parametrize("precision, deepspeed, scale, fused", [
    ("bf16", "none", {"enabled": False}, True),  # bf16 has fp32's range: no scaling, no per-step sync
    ("fp16", "none", "dynamic", True),
    ("bf16", "zero2", {"enabled": False}, False),  # DeepSpeed builds its own optimizer wrapper
])
def test_gpu_optimizer_wrapper_scales_fp16_only_and_fuses_adamw(precision, deepspeed, scale, fused):
    p = replace(PARAMS, train=replace(PARAMS.train, precision=precision, deepspeed=deepspeed, global_batch=16))
    resolved = plan.resolve(p, **H100)
    settings = plan.run_settings(resolved, p.train.max_iters)
    assert settings["loss_scale"] == scale and settings["fused_optimizer"] == fused
    text = assistant_config.text(p, resolved)
    assert (f"loss_scale={scale!r}," in text) and (", fused=True)" in text) == fused
    cpu = assistant_config.text(PARAMS, plan.resolve(PARAMS, cuda=False, bf16=False))
    assert "loss_scale" not in cpu and "fused=True" not in cpu  # OptimWrapper on the CPU, as before
    eight_bit = replace(p, train=replace(p.train, optimizer="adamw8bit"))
    assert "fused=True" not in assistant_config.text(eight_bit, plan.resolve(eight_bit, **H100))


def test_disabled_loss_scale_is_a_plain_optimizer_step():
    """What `loss_scale={'enabled': False}` builds: torch's GradScaler switched off, which passes the loss
    through unscaled and steps the optimizer directly (the same update as without a scaler)."""
    import torch

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    w, plain = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt, plain_opt = torch.optim.AdamW([w], lr=0.1), torch.optim.AdamW([plain], lr=0.1)
    for _ in range(3):
        loss = (w * w * 2).sum()
        assert scaler.scale(loss) is loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        (plain * plain * 2).sum().backward()
        plain_opt.step()
        plain_opt.zero_grad()
    assert scaler.state_dict() == {} and torch.equal(w.detach(), plain.detach()) and not torch.equal(w, torch.ones(3))


def test_tiny_models_train_on_one_cpu_thread():
    """The smallest stand-ins (hidden 64-128) on the CPU: one thread; the default's 192 or a real width on the
    CPU, or any GPU run: torch's default. OMP_NUM_THREADS, when the user sets it, wins."""
    tiny = {"hidden": 64, "layers": 2, "intermediate": 192, "vocab": 2000, "kv": 64, "arch": "InternLM2ForCausalLM"}
    assert plan.resolve(PARAMS, cuda=False, bf16=False, shape=tiny)["cpu_threads"] == 1
    assert plan.resolve(PARAMS, cuda=False, bf16=False, shape=SHAPE_1_8B)["cpu_threads"] is None
    assert plan.resolve(PARAMS, cuda=True, bf16=True, card_gb=85.0, shape=tiny)["cpu_threads"] is None
    code = ("import os, torch; from stages.modeldir import use_threads; torch.set_num_threads(2); use_threads(1); "
            "print(torch.get_num_threads())")
    import subprocess
    import sys

    for omp, expect in ((None, "1"), ("2", "2")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ({"OMP_NUM_THREADS": omp} if omp else {})
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expect, out.stderr[-500:]


def test_cuda_graphs_put_the_host_ahead_on_one_gpu_the_graphs_only_without_checkpointing():
    """train.cuda_graphs: compiled layers replayed as CUDA graphs and the overlap hook with pinned batches,
    on one GPU with nothing checkpointed (the default there); with checkpointed layers or layers not compiled
    the overlap hook alone; on several GPUs, on the CPU, or with cuda_graphs false, neither."""
    def rendered(**train):
        p = replace(PARAMS, data=replace(PARAMS.data, max_length=2048),
                    train=replace(PARAMS.train, global_batch=16, memory_gb=24.0, **train))
        resolved = plan.resolve(p, **H100)
        return resolved, assistant_config.text(p, resolved)

    off, text = rendered(cuda_graphs=False, activation_checkpointing=False)
    assert not off["cuda_graphs"] and "Overlap" not in text and "pin_memory" not in text
    on, text = rendered(activation_checkpointing=False)
    assert on["cuda_graphs"] and on["compile_layers"] and "dict(type=Overlap)" in text and "pin_memory=True" in text
    for train in (dict(activation_checkpointing=True), dict(compile_layers=False),
                  dict(activation_checkpointing=True, offload_activations=True, micro_batch=16)):
        resolved, text = rendered(cuda_graphs=True, **train)
        assert not resolved["cuda_graphs"] and resolved["overlap"], train
        assert "dict(type=Overlap)" in text and "pin_memory=True" in text, train
    resolved, text = rendered(cuda_graphs=True, gpus=2)
    assert not resolved["cuda_graphs"] and not resolved["overlap"] and "Overlap" not in text
    cpu = plan.resolve(replace(PARAMS, train=replace(PARAMS.train, cuda_graphs=True)), **MACHINES["cpu"])
    assert not cpu["cuda_graphs"] and not cpu["overlap"]


def test_tuned_kernels_and_the_rope_table_apply_where_layers_compile_on_a_gpu(monkeypatch):
    """train.tune_kernels (off by default) reaches the pipeline block where layers compile on a GPU, nowhere else;
    the rope table is on wherever the train stage runs on a GPU. The kernels module then sets inductor's
    multi-kernel reductions and coordinate-descent tuning, with a cache directory of the run's own."""
    from torch._inductor import config

    from stages import kernels

    def resolved(**train):
        return plan.resolve(replace(PARAMS, train=replace(PARAMS.train, **train)), **H100)

    assert not PARAMS.train.tune_kernels and not resolved()["tune_kernels"] and resolved()["rope_table"]
    assert resolved(tune_kernels=True)["tune_kernels"]
    assert not resolved(tune_kernels=True, compile_layers=False)["tune_kernels"]
    cpu = plan.resolve(replace(PARAMS, train=replace(PARAMS.train, tune_kernels=True)), **MACHINES["cpu"])
    assert not cpu["tune_kernels"] and not cpu["rope_table"]
    monkeypatch.delenv("PIPELINE_TUNED_CACHE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/nonexistent/shared-cache")
    with config.patch({"triton.multi_kernel": 0, "coordinate_descent_tuning": False}):
        kernels.tune_kernels()
        assert config.triton.multi_kernel == 1 and config.coordinate_descent_tuning
    own = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert own == os.environ["PIPELINE_TUNED_CACHE"] != "/nonexistent/shared-cache" and os.path.isdir(own)
    os.rmdir(own)


def test_offloaded_activations_checkpoint_every_layer_through_the_pipeline_and_plan_for_it():
    """train.offload_activations: every checkpointed layer is the pipeline's own (the model's checkpointing
    cannot offload), the estimate drops by the layers' inputs (2 bytes x hidden a token a layer), a tight
    budget fits where it did not (the 7B shape in 8 GB: benchmarks/README.md's lean run); never on the CPU, and
    nothing offloaded when nothing is checkpointed."""
    def resolved(**train):
        p = replace(PARAMS, data=replace(PARAMS.data, max_length=2048),
                    train=replace(PARAMS.train, global_batch=16, **train))
        return plan.resolve(p, **H100)

    kept = resolved(memory_gb=24.0, micro_batch=16, activation_checkpointing=True)
    off = resolved(memory_gb=24.0, micro_batch=16, activation_checkpointing=True, offload_activations=True)
    assert kept["checkpoint_layers"] is None and not kept["offload_activations"]
    assert off["checkpoint_layers"] == SHAPE_1_8B["layers"] and off["offload_activations"] and off["checkpointing"]
    assert kept["estimate_gb"] - off["estimate_gb"] == pytest.approx(16 * 2048 * 2 * 2048 * 24 / 1e9, abs=0.1)
    shape_7b = {"hidden": 4096, "layers": 32, "intermediate": 14336, "vocab": 92544, "kv": 1024,
                "arch": "InternLM2ForCausalLM"}
    tight, lean = (plan.resolve(replace(PARAMS, data=replace(PARAMS.data, max_length=2048), train=replace(
        PARAMS.train, global_batch=16, memory_gb=8.0, optimizer="paged_adamw8bit", offload_activations=o)),
        cuda=True, bf16=True, card_gb=85.0, shape=shape_7b) for o in (False, True))
    assert tight["micro_batch"] == lean["micro_batch"] == 1 and tight["estimate_gb"] > 8.0 >= lean["estimate_gb"]
    assert lean["offload_activations"] and lean["checkpoint_layers"] == 32
    assert not resolved(memory_gb=80.0, offload_activations=True)["offload_activations"]  # nothing checkpointed
    cpu = plan.resolve(replace(PARAMS, train=replace(PARAMS.train, offload_activations=True)), **MACHINES["cpu"])
    assert not cpu["offload_activations"] and not cpu["checkpoint_layers"]
    text = assistant_config.text(replace(PARAMS, data=replace(PARAMS.data, max_length=2048), train=replace(
        PARAMS.train, global_batch=16, memory_gb=24.0, micro_batch=16, activation_checkpointing=True,
        offload_activations=True)), off)
    assert "'offload_activations': True" in text and "use_activation_checkpointing=True" in text


def test_mlps_in_slices_where_every_layer_is_rebuilt_without_dropout():
    """`tile_mlp` (stages/kernels.py): at Unsloth's setting (micro-batch 16, every layer checkpointed and offloaded)
    with the peers' LoRA (dropout 0), the checkpointed layers' MLPs are rebuilt in 2 slices of 16,384 tokens and
    the estimate drops by half the rebuilt layer's intermediate-wide part; with dropout, on the CPU,
    or where a slice would be the whole micro-batch, nothing is sliced and the plan is as before."""
    def resolved(dropout, machine=H100, **train):
        p = replace(PARAMS, data=replace(PARAMS.data, max_length=2048), lora=replace(PARAMS.lora, dropout=dropout),
                    train=replace(PARAMS.train, global_batch=16, **train))
        return plan.resolve(p, **machine)

    unsloth = dict(memory_gb=40.0, micro_batch=16, activation_checkpointing=True, offload_activations=True)
    sliced, masked = resolved(0.0, **unsloth), resolved(0.1, **unsloth)
    assert sliced["tile_mlp"] == 2 and sliced["checkpoint_layers"] == 24 and masked["tile_mlp"] == 0
    tokens = 16 * 2048
    drop = masked["estimate_gb"] - sliced["estimate_gb"]
    assert drop == pytest.approx(tokens * 11.7 * 8192 / 2 / 1e9, abs=0.1)
    kept = resolved(0.0, memory_gb=40.0, micro_batch=16, activation_checkpointing=True)
    assert kept["tile_mlp"] == 2 and kept["checkpoint_layers"] == 24  # the pipeline's checkpointing, not the model's
    assert resolved(0.0, memory_gb=24.0)["tile_mlp"] == 0  # nothing checkpointed
    assert resolved(0.0, memory_gb=40.0, micro_batch=4, activation_checkpointing=True)["tile_mlp"] == 0  # one slice
    assert resolved(0.0, MACHINES["cpu"], activation_checkpointing=True)["tile_mlp"] == 0

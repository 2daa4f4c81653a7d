"""The train stage's kernels against transformers' own loss, and the out-of-memory message."""
import pytest
import torch

from stages import kernels
from stages.train import out_of_memory_message
from stages.xtuner_api import patch_stack


def tiny_llama(vocab: int = 1000):
    patch_stack()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    return LlamaForCausalLM(cfg).train()


def loss_and_grads(model, ids, labels):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [None, 7])
def test_fused_loss_equals_transformers_loss_and_gradients(chunk, monkeypatch):
    """Labels shifted by one, -100 ignored, several chunks (7 tokens) or one; the head is trained
    here too, so its gradient is checked as well."""
    model = tiny_llama()
    ids = torch.randint(0, 1000, (2, 50))
    labels = ids.clone()
    labels[0, :10] = -100
    reference, ref_grads = loss_and_grads(model, ids, labels)
    assert kernels.install_fused_loss(model)
    if chunk:
        monkeypatch.setitem(kernels._SETTINGS, "loss_chunk", chunk * 1000 * 8)  # bytes: chunks of 4 tokens
    fused, grads = loss_and_grads(model, ids, labels)
    assert fused.logits is None  # never materialised
    assert torch.allclose(fused.loss, reference.loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6), name


def test_fused_loss_lets_go_of_its_gradient_in_the_backward_pass():
    """The gradient of the hidden states, computed with the loss, is handed over in the backward pass, not kept
    with the graph (which lives until the whole backward pass ends: 134 MB through it at micro-batch 16 of the
    1.8B shape); a second backward over the same graph stops with a clear error, not a wrong gradient."""
    hidden = torch.randn(1, 30, 8, requires_grad=True)
    loss = kernels.linear_cross_entropy(hidden, torch.randn(50, 8), torch.randint(0, 50, (1, 30)), chunk=7)
    assert loss.grad_fn.grads[0] is not None
    loss.backward(retain_graph=True)
    assert loss.grad_fn.grads is None and hidden.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="runs once a forward"):
        loss.backward()


def test_compiled_loss_is_traced_whole_and_gives_the_same_loss_and_gradients(monkeypatch):
    """`compile_loss` (with compiled layers): each chunk's softmax through torch.compile in one graph
    (fullgraph), here with the aot_eager backend (inductor on a CPU compiles for 10 s); the GPU runs
    inductor (benchmarks/README.md, "The loss compiled")."""
    model = tiny_llama()
    ids = torch.randint(0, 1000, (2, 50))
    labels = ids.clone()
    labels[1, 30:] = -100
    reference, ref_grads = loss_and_grads(model, ids, labels)
    real, calls = torch.compile, []

    def compile(fn, **kwargs):  # as compiled_chunk_loss calls it, observed
        calls.append(kwargs)
        return real(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile)
    kernels.compiled_chunk_loss.cache_clear()
    monkeypatch.setitem(kernels._SETTINGS, "compile_loss", True)
    monkeypatch.setitem(kernels._SETTINGS, "loss_chunk", 16 * 1000 * 8)  # chunks of 16 tokens: the last one shorter
    kernels.install_fused_loss(model)
    compiled, grads = loss_and_grads(model, ids, labels)
    kernels.compiled_chunk_loss.cache_clear()
    assert calls == [{"dynamic": False, "fullgraph": True}]
    assert torch.allclose(compiled.loss, reference.loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6), name


def test_fused_loss_leaves_generation_and_evaluation_alone():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 12))
    kernels.install_fused_loss(model)
    assert model(input_ids=ids).logits.shape == (1, 12, 1000)  # no labels: the model's own forward
    model.eval()
    assert model(input_ids=ids, labels=ids).logits is not None  # eval: the model's own forward


def test_chunk_size_fits_its_budget():
    assert kernels.chunk_tokens(92544) == 1024  # 1 GB of float32 logits and softmax
    assert kernels.chunk_tokens(92544, 256 << 20) == 256
    assert kernels.chunk_tokens(2048) == 65536


def test_frozen_weights_return_to_the_compute_dtype():
    model = tiny_llama().to(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    kernels._frozen_to(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_compiled_layers_are_used_only_in_training_mode(monkeypatch):
    """The training forward of each layer is the torch.compile'd one (dynamo traces it; a counting backend
    runs the captured graph, so the logits match eager ones exactly); eval mode never enters it."""
    from torch._dynamo.testing import CompileCounter

    counter, calls, real = CompileCounter(), [], torch.compile

    def compile(fn, **kwargs):  # torch.compile as compile_layers calls it, observed
        compiled = real(fn, backend=counter, **kwargs)

        def run(*args, **kw):
            calls.append(fn)
            return compiled(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", compile)
    torch._dynamo.reset()
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 8))
    model.eval()
    expected_eval = model(input_ids=ids).logits
    expected_train = model.train()(input_ids=ids).logits
    assert kernels.compile_layers(model) == 2
    assert torch.equal(model.eval()(input_ids=ids).logits, expected_eval)
    assert calls == [] and counter.frame_count == 0  # eval: eager, nothing compiled
    assert torch.allclose(model.train()(input_ids=ids).logits, expected_train, atol=1e-6)
    assert len(calls) == 2 and counter.frame_count >= 1  # training: both layers through the compiled forward


@pytest.fixture
def xtuner_builds_with_apply(monkeypatch):
    """XTuner's sft module as it comes, as kernels.apply leaves it, restored afterwards (the patch is for the
    process: a stage run in this process before, such as the train stage's, has made it already)."""
    patch_stack()
    from peft import prepare_model_for_kbit_training
    from xtuner.model import sft
    from xtuner.model.modules import dispatch_modules

    monkeypatch.setattr(sft, "dispatch_modules", dispatch_modules)  # sft's own imports of them
    monkeypatch.setattr(sft, "prepare_model_for_kbit_training", prepare_model_for_kbit_training)
    monkeypatch.setattr(kernels, "_SETTINGS", {})
    return sft


def xtuner_lora_model(sft, folder, dtype=torch.float32):
    """XTuner's SupervisedFinetune with LoRA, from a config as a rendered one gives it (a tiny Llama saved
    to `folder`)."""
    from mmengine.config import ConfigDict
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        tiny_llama().save_pretrained(folder)
    llm = ConfigDict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=str(folder),
                     torch_dtype=dtype)
    return sft.SupervisedFinetune(llm=llm, lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                                  use_activation_checkpointing=False)


@pytest.mark.parametrize("fused", [True, False])
def test_xtuner_builds_its_model_with_the_fused_loss_through_dispatch_modules(xtuner_builds_with_apply, tmp_path,
                                                                               fused):
    sft = xtuner_builds_with_apply
    assert not getattr(xtuner_lora_model(sft, tmp_path).llm.base_model.model, "_fused_loss", False)  # XTuner alone
    kernels.apply({"fused_loss": fused, "compute_dtype": "float32"})
    llm = xtuner_lora_model(sft, tmp_path).llm.base_model.model
    assert getattr(llm, "_fused_loss", False) == fused
    ids = torch.randint(0, 1000, (2, 10))
    out = llm.train()(input_ids=ids, labels=ids)
    assert (out.logits is None) == fused and out.loss.isfinite()


def test_xtuner_lora_keeps_frozen_weights_in_the_compute_dtype_through_prepare(xtuner_builds_with_apply, tmp_path):
    """peft's prepare_model_for_kbit_training (XTuner calls it for every LoRA run) casts frozen bf16 weights
    to float32; with upcast_frozen false they are back in bf16 after it, the LoRA weights untouched."""
    sft = xtuner_builds_with_apply
    frozen = lambda model: {p.dtype for p in model.parameters() if not p.requires_grad}  # noqa: E731
    assert frozen(xtuner_lora_model(sft, tmp_path, torch.bfloat16)) == {torch.float32}  # XTuner alone
    kernels.apply({"upcast_frozen": True, "compute_dtype": "bfloat16"})
    assert frozen(xtuner_lora_model(sft, tmp_path, torch.bfloat16)) == {torch.float32}  # asked for: as XTuner does
    kernels.apply({"upcast_frozen": False, "compute_dtype": "bfloat16"})
    model = xtuner_lora_model(sft, tmp_path, torch.bfloat16)
    assert frozen(model) == {torch.bfloat16}
    assert {n for n, p in model.named_parameters() if p.requires_grad} and \
        all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_out_of_memory_message_names_what_to_change():
    msg = out_of_memory_message({"micro_batch": 16, "checkpointing": False, "estimate_gb": 153.6, "memory_gb": 70,
                                 "fused_loss": False, "upcast_frozen": True, "deepspeed": "none"})
    assert "\n" not in msg and msg.startswith("out of GPU memory at micro-batch 16")
    for needle in ("train.memory_gb", "train.activation_checkpointing: true", "train.fused_loss: true",
                   "quant.upcast_frozen: false", "train.optimizer: paged_adamw8bit"):
        assert needle in msg
    checkpointed = out_of_memory_message({"micro_batch": 1, "checkpointing": True, "estimate_gb": 8.1, "memory_gb": 8,
                                          "fused_loss": True, "upcast_frozen": False, "deepspeed": "none"})
    assert "train.offload_activations: true" in checkpointed and "activation_checkpointing" not in checkpointed
    assert "train.fp8" not in msg and "train.fp8" not in checkpointed
    fp8 = out_of_memory_message({"micro_batch": 4, "checkpointing": False, "estimate_gb": 21.7, "memory_gb": 24,
                                 "fused_loss": True, "fp8": True, "deepspeed": "none"})
    assert "train.fp8: false" in fp8


def test_full_batches_pad_the_short_batch_without_changing_its_loss_or_gradients(xtuner_builds_with_apply, tmp_path):
    """The epoch's last, short batch made `micro_batch` rows of `max_length` tokens for compiled layers: the loss
    and every LoRA gradient are the short batch's (XTuner's model, the fused loss, float32 on the CPU)."""
    from xtuner.dataset.collate_fns import default_collate_fn

    sft = xtuner_builds_with_apply
    kernels.apply({"fused_loss": True, "compute_dtype": "float32"})
    model = xtuner_lora_model(sft, tmp_path).train()
    torch.manual_seed(1)
    rows = [{"input_ids": torch.randint(1, 1000, (n,)).tolist()} for n in (64, 40, 64)]  # a short pack among them
    for row in rows:
        row["labels"] = list(row["input_ids"])
        row["labels"][:5] = [-100] * 5

    def step(batch):
        model.zero_grad()
        loss = model(batch["data"], mode="loss")["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    short = default_collate_fn(rows, use_varlen_attn=False)
    full = kernels.full_batches(rows, micro_batch=4, max_length=64, use_varlen_attn=False)
    assert short["data"]["input_ids"].shape == (3, 64) and full["data"]["input_ids"].shape == (4, 64)
    assert (full["data"]["labels"][3] == -100).all()
    (loss, grads), (padded_loss, padded_grads) = step(short), step(full)
    assert torch.allclose(padded_loss, loss, atol=1e-6)
    assert grads and grads.keys() == padded_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(padded_grads[name], grad, atol=1e-6), name
    one = [{**rows[1]}]  # one short pack alone: padded to max_length too
    assert kernels.full_batches(one, micro_batch=1, max_length=64)["data"]["input_ids"].shape == (1, 64)
    same = kernels.full_batches(rows[:1] * 4, micro_batch=4, max_length=64)  # a full batch: as XTuner collates it
    for key, value in default_collate_fn(rows[:1] * 4)["data"].items():
        assert torch.equal(same["data"][key], value), key


def test_fp8_on_a_gpu_without_float8_stops_with_one_line_naming_the_key(xtuner_builds_with_apply, tmp_path,
                                                                          monkeypatch):
    """train.fp8 on a GPU below compute capability 8.9 (an A100, say): the train stage stops as XTuner builds the
    model, naming the key and the GPU, before any step."""
    from stages import fp8
    from stages.errors import StageError

    monkeypatch.setattr(fp8, "check_gpu", lambda: "NVIDIA A100-SXM4-80GB (compute capability 8.0; float8 needs 8.9 "
                                                  "or above)")
    kernels.apply({"fp8": True, "compute_dtype": "float32"})
    with pytest.raises(StageError, match=r"^train\.fp8: true, but this machine's GPU cannot multiply float8: "
                                         r"NVIDIA A100.*; set train\.fp8: false$"):
        xtuner_lora_model(xtuner_builds_with_apply, tmp_path)


def test_tuned_kernels_compile_into_a_cache_of_the_runs_own_removed_at_its_end(tmp_path):
    """`train.tune_kernels`: the process's inductor cache is a directory of its own (a second tuned run that read
    the first's cache failed on the GPU machine), which inductor writes to and which is gone when the process ends;
    the cache the user set stays untouched. Inductor on the CPU here (its C++ kernels use the same cache)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    shared = tmp_path / "shared-cache"
    shared.mkdir()
    code = ("import os, torch; from stages import kernels; kernels.tune_kernels(); "
            "f = torch.compile(lambda x: x.sin() * 2 + 1); f(torch.randn(64)); "
            "own = os.environ['TORCHINDUCTOR_CACHE_DIR']; print(own); print(sum(len(f) for _, _, f in os.walk(own)))")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(shared)}
    env.pop("PIPELINE_TUNED_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    own, files = out.stdout.split()[-2:]
    assert own != str(shared) and int(files) > 0  # inductor wrote its kernels there
    assert not os.path.exists(own) and not any(shared.iterdir())  # gone at the end; the user's cache untouched

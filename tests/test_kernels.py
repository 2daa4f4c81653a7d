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


def test_compiled_layers_are_used_only_in_training_mode():
    model = tiny_llama()
    ids = torch.randint(0, 1000, (1, 8))
    model.eval()
    expected = model(input_ids=ids).logits
    assert kernels.compile_layers(model) == 2
    assert torch.equal(model(input_ids=ids).logits, expected)  # eval: eager, nothing compiled yet


def test_out_of_memory_message_names_what_to_change():
    msg = out_of_memory_message({"micro_batch": 16, "checkpointing": False, "estimate_gb": 153.6, "memory_gb": 70,
                                 "fused_loss": False, "upcast_frozen": True, "deepspeed": "none"})
    assert "\n" not in msg and msg.startswith("out of GPU memory at micro-batch 16")
    for needle in ("train.memory_gb", "train.activation_checkpointing: true", "train.fused_loss: true",
                   "quant.upcast_frozen: false", "train.optimizer: paged_adamw8bit"):
        assert needle in msg

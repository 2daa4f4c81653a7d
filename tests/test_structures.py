"""The real model structures (stages/structures.py) and what training needs of them: LoRA targets that
leave InternLM2's output head alone (so the fused loss applies), its SDPA attention, and einops in the
lean processes of convert and merge."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.structures import BLOCK_LINEARS, internlm2_config, llama_config, lora_targets, new_causal_lm

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=128, bos=1, eos=2, pad=2)


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structures") / "tiny_internlm2"
    model = new_causal_lm(folder, internlm2_config(**SHAPE), seed=0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                **kwargs)


def test_a_directory_as_a_download_loads_through_its_own_remote_code(internlm2_dir):
    cfg = json.loads((internlm2_dir / "config.json").read_text())
    assert cfg["auto_map"]["AutoConfig"] == "configuration_internlm2.InternLM2Config"
    assert (internlm2_dir / "modeling_internlm2.py").is_file()
    model = load(internlm2_dir)
    assert type(model).__name__ == "InternLM2ForCausalLM" and model.config.attn_implementation == "eager"
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert {"wqkv", "wo", "w1", "w2", "w3", "output", "attention_norm", "ffn_norm"} <= names


def test_llama_case_has_the_same_shape_without_remote_code(tmp_path):
    model = new_causal_lm(tmp_path / "llama", llama_config(**SHAPE), seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not (tmp_path / "llama" / "modeling_internlm2.py").exists()
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in new_causal_lm(tmp_path / "il2", internlm2_config(**SHAPE), seed=0).parameters())


def test_all_linear_means_the_blocks_linear_layers():
    assert lora_targets({"architectures": ["InternLM2ForCausalLM"]}, "all-linear") == ["w1", "w2", "w3", "wo", "wqkv"]
    assert "lm_head" not in lora_targets({"architectures": ["LlamaForCausalLM"]}, "all-linear")
    assert lora_targets({"architectures": ["SomethingNew"]}, "all-linear") == "all-linear"  # peft's own rule
    assert lora_targets({"architectures": ["InternLM2ForCausalLM"]}, ["wqkv", "output"]) == ["output", "wqkv"]


def test_xtuners_own_search_adapts_internlm2s_head_and_ours_does_not(internlm2_dir):
    """Why the InternLM2 structure took 63.9 GB on the GPU: XTuner's target search (target_modules=None)
    also adapts the 92,544-row head `output`, and a LoRA head is no plain linear layer, so the fused loss
    was never installed and the whole micro-batch's logits were materialised."""
    from stages.xtuner_api import patch_stack

    patch_stack()
    from peft import LoraConfig, get_peft_model
    from xtuner.model.utils import find_all_linear_names

    from stages.kernels import install_fused_loss

    assert "output" in find_all_linear_names(load(internlm2_dir))
    ours = BLOCK_LINEARS["InternLM2ForCausalLM"]
    model = get_peft_model(load(internlm2_dir), LoraConfig(r=4, target_modules=ours, task_type="CAUSAL_LM"))
    assert type(model.base_model.model.output).__name__ == "Linear"  # torch's, not peft's
    assert install_fused_loss(model.base_model.model)
    xtuner = get_peft_model(load(internlm2_dir), LoraConfig(r=4, target_modules=find_all_linear_names(
        load(internlm2_dir)), task_type="CAUSAL_LM"))
    assert not install_fused_loss(xtuner.base_model.model)


def test_internlm2_trains_with_its_sdpa_class_and_the_same_result(internlm2_dir):
    import torch

    from stages.kernels import use_sdpa

    eager, sdpa = load(internlm2_dir).train(), load(internlm2_dir).train()
    assert use_sdpa(sdpa) == SHAPE["num_layers"]
    assert {type(layer.attention).__name__ for layer in sdpa.model.layers} == {"InternLM2SdpaAttention"}
    assert sdpa.config.attn_implementation == "sdpa" and use_sdpa(sdpa) == 0  # once
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = eager(input_ids=ids, labels=ids), sdpa(input_ids=ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    a.loss.backward(), b.loss.backward()
    torch.testing.assert_close(eager.model.layers[0].attention.wqkv.weight.grad,
                               sdpa.model.layers[0].attention.wqkv.weight.grad, atol=1e-5, rtol=1e-4)


def test_grouped_query_attention_gives_the_sdpa_class_result_without_copying_keys_and_values(internlm2_dir):
    """`use_gqa` (pipeline key `gqa`, on a GPU): 4 query heads over 2 key-value heads through SDPA's grouped-query
    attention, against the remote code's SDPA class (which copies each key and value head to its query heads):
    the same logits, loss and gradients in training, no `repeat_kv` called; with a cache (generation) and in
    one graph when compiled, as the layers are on a GPU."""
    import torch
    import torch._dynamo

    from stages.kernels import static_rope, use_gqa, use_sdpa

    sdpa, gqa = load(internlm2_dir).train(), load(internlm2_dir).train()
    use_sdpa(sdpa), use_sdpa(gqa)
    assert use_gqa(gqa) == SHAPE["num_layers"]
    assert {type(layer.attention).__name__ for layer in gqa.model.layers} == {"GroupedQuerySdpaAttention"}
    remote = sys.modules[type(sdpa).__module__]
    repeats = []
    real_repeat = remote.repeat_kv
    remote.repeat_kv = lambda *a: repeats.append(1) or real_repeat(*a)
    try:
        ids = torch.randint(3, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
        # training as XTuner's model does it: no cache (`config.use_cache = False`)
        a, b = sdpa(input_ids=ids, labels=ids, use_cache=False), gqa(input_ids=ids, labels=ids, use_cache=False)
        assert len(repeats) == 2 * SHAPE["num_layers"]  # the SDPA class's keys and values; none of GQA's
        torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-5)
        a.loss.backward(), b.loss.backward()
        for (name, p), q in zip(sdpa.named_parameters(), gqa.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
        sdpa.eval(), gqa.eval()
        with torch.no_grad():
            ours = gqa.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(ours, sdpa.generate(ids[:1, :5], max_new_tokens=4, do_sample=False))
    finally:
        remote.repeat_kv = real_repeat
    torch._dynamo.reset()
    x = torch.randn(2, 16, SHAPE["hidden_size"])
    pos = torch.arange(16)[None].expand(2, -1)
    gqa.train(), static_rope(gqa, SHAPE["max_position_embeddings"])  # as the train stage runs it
    assert torch._dynamo.explain(gqa.model.layers[0])(x, attention_mask=None, position_ids=pos).graph_count == 1


def test_static_rope_is_the_same_rotary_embedding_without_a_graph_break(internlm2_dir):
    """internlm2-chat's dynamic NTK rotary embedding asks `max(position_ids) + 1 > max_position_embeddings`
    in every layer: a host sync and a graph break in each compiled layer. Below that length the plain
    class of the same code gives the same result in one graph."""
    import torch
    import torch._dynamo

    from stages.kernels import static_rope, use_sdpa

    dynamic, static = load(internlm2_dir).train(), load(internlm2_dir).train()
    use_sdpa(dynamic), use_sdpa(static)
    assert {type(layer.attention.rotary_emb).__name__ for layer in dynamic.model.layers} == {
        "InternLM2DynamicNTKScalingRotaryEmbedding"}
    assert static_rope(static, SHAPE["max_position_embeddings"] + 1) == 0  # longer runs keep the dynamic class
    assert static_rope(static, SHAPE["max_position_embeddings"]) == SHAPE["num_layers"]
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dynamic(input_ids=ids).logits, static(input_ids=ids).logits, atol=0, rtol=0)

    def graphs(model):
        torch._dynamo.reset()
        x = torch.randn(2, 16, SHAPE["hidden_size"])
        pos = torch.arange(16)[None].expand(2, -1)
        return torch._dynamo.explain(model.model.layers[0])(x, attention_mask=None, position_ids=pos).graph_count

    assert graphs(dynamic) > 1 and graphs(static) == 1


def test_rope_table_gives_the_same_bits_as_the_code_and_falls_back_outside_it(internlm2_dir):
    """`rope_table` (pipeline key `rope_table`, on a GPU): in training, cos and sin gathered from one table of the
    run's positions are the code's own values bit for bit, so the logits and every LoRA gradient are too; one
    graph when compiled; eval mode (generation) and a sequence longer than the table run the code's forward."""
    import torch
    import torch._dynamo

    from stages.kernels import rope_table, static_rope, use_gqa, use_sdpa

    plain, table = load(internlm2_dir).train(), load(internlm2_dir).train()
    for model in (plain, table):
        use_sdpa(model), use_gqa(model), static_rope(model, 24)
    assert rope_table(table, 24) == SHAPE["num_layers"]
    embeddings = [layer.attention.rotary_emb for layer in table.model.layers]
    assert {type(e).__name__ for e in embeddings} == {"RotaryTable"}
    # one table for every layer, held by the first: moving the model moves one (here to float64 and back)
    assert all(e.rope_holder is embeddings[0] for e in embeddings)
    assert [name for name, _ in table.named_buffers() if "rope_" in name] == [
        "model.layers.0.attention.rotary_emb.rope_cos", "model.layers.0.attention.rotary_emb.rope_sin"]
    table.double().float()
    assert embeddings[1].rope_holder.rope_cos.dtype == torch.float32
    assert "rope_cos" not in "".join(table.state_dict())  # not saved with the model
    reference = plain.model.layers[0].attention.rotary_emb
    x = torch.zeros(1, dtype=torch.bfloat16)
    pos = torch.tensor([[0, 5, 23, 1, 2, 17]])
    for got, want in zip(embeddings[0](x, pos), reference(x, pos)):
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = plain(input_ids=ids, labels=ids, use_cache=False), table(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    a.loss.backward(), b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), table.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)

    calls = []
    real = type(reference).forward
    type(reference).forward = lambda self, *args: calls.append(1) or real(self, *args)
    try:
        embeddings[0](x, pos), embeddings[0](x, torch.arange(25)[None])  # the table's, then a longer sequence
        assert len(calls) == 1
        table.eval()
        with torch.no_grad():
            out = table.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        assert len(calls) > 1
        plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(out, plain.generate(ids[:1, :5], max_new_tokens=4, do_sample=False))
    finally:
        type(reference).forward = real
    torch._dynamo.reset()
    table.train()
    h = torch.randn(2, 16, SHAPE["hidden_size"])
    pos = torch.arange(16)[None].expand(2, -1)
    assert torch._dynamo.explain(table.model.layers[0])(h, attention_mask=None, position_ids=pos).graph_count == 1


def test_kernels_dispatch_switches_attention_of_the_model_xtuner_builds(internlm2_dir, monkeypatch):
    from stages.xtuner_api import patch_stack

    patch_stack()
    from xtuner.model import sft

    from stages import kernels

    for name in ("dispatch_modules", "prepare_model_for_kbit_training"):  # the patch is undone afterwards
        monkeypatch.setattr(sft, name, getattr(sft, name))
    monkeypatch.setattr(kernels, "_SETTINGS", {})
    kernels.apply({"fused_loss": True, "compute_dtype": "float32", "max_length": 64})
    model = load(internlm2_dir)
    sft.dispatch_modules(model)
    assert model.config.attn_implementation == "sdpa" and model._fused_loss
    assert {type(layer.attention.rotary_emb).__name__ for layer in model.model.layers} == {"InternLM2RotaryEmbedding"}


LEAN_FORWARD = """
import sys, torch
from stages import xtuner_api
if sys.argv[2] == "fixed":
    xtuner_api.lean_imports()
else:  # the entries lean_imports leaves, without finding einops' torch backend first
    for name in xtuner_api.LEAN + xtuner_api.OPTIONAL:
        sys.modules.setdefault(name, None)
xtuner_api.patch_stack()
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, local_files_only=True)
print(model(input_ids=torch.tensor([[1, 5, 7, 9]])).logits.shape)
"""


@pytest.mark.parametrize("how", ["fixed", "unfixed"])
def test_internlm2_runs_in_a_lean_process(internlm2_dir, how):
    """The merge stage's crash on InternLM2 (`import of tensorflow halted; None in sys.modules`): InternLM2's
    attention calls einops, which looked for a backend among the None entries. Fixed: it runs."""
    proc = subprocess.run([sys.executable, "-c", LEAN_FORWARD, str(internlm2_dir), how], capture_output=True,
                          text=True, cwd=ROOT)
    if how == "fixed":
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "torch.Size([1, 4, 256])" in proc.stdout
    else:  # the control: what the stage did before the fix
        assert proc.returncode != 0 and "None in sys.modules" in proc.stderr


def test_doctor_names_the_structure_and_refuses_missing_remote_code(internlm2_dir, tmp_path):
    import shutil

    from stages import doctor, params as P

    p = P.load(ROOT / "params.yaml")
    check = doctor.check_structure(p, internlm2_dir)
    assert check.ok and check.detail.startswith("InternLM2 (remote code); attention sdpa")
    assert check.detail.endswith("LoRA on w1, w2, w3, wo, wqkv")
    broken = tmp_path / "broken"
    shutil.copytree(internlm2_dir, broken)
    (broken / "modeling_internlm2.py").unlink()
    check = doctor.check_structure(p, broken)
    assert not check.ok and check.fatal
    assert check.detail == (f"{broken / 'config.json'}: names remote code that is not in the folder: "
                            "modeling_internlm2.py (copy the model's *.py files beside it)")


@pytest.mark.e2e
def test_the_llama_format_case_runs_the_whole_pipeline(built, tmp_path):
    """Many users bring Llama-format models: the same DAG on `stand_in.tiny.llm.architecture: llama`, by a real
    `dvc exp run`, to the report."""
    from tests.conftest import experiment_in_copy

    dest = tmp_path / "llama"
    out = experiment_in_copy(built, dest, "llama", "stand_in.tiny.llm.architecture=llama",
                             "stand_in.tiny.llm.pretrain_steps=20", "train.max_iters=20")
    for stage in ("stand_in@tiny", "train", "select", "convert", "merge", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out
    cfg = json.loads((dest / "models/assistant/llm/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
    assert "target_modules=['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in (
        dest / "models/config/xtuner_config.py").read_text()
    merge = json.loads((dest / "reports/merge.json").read_text())
    assert merge["max_logit_diff"] <= merge["tolerance"]
    assert json.loads((dest / "reports/eval/metrics.json").read_text())


def counted_layers(model) -> list[int]:
    """Each decoder layer's forward calls, counted into the list returned."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        def count(*args, _i=i, _forward=layer.forward, **kwargs):
            calls[_i] += 1
            return _forward(*args, **kwargs)
        layer.forward = count
    return calls


def test_offloaded_checkpoints_give_the_same_gradients_and_keep_only_the_inputs(internlm2_dir, monkeypatch):
    """`checkpoint_first(..., offload=True)` on every layer of a LoRA model (dropout 0.5, frozen embeddings, as
    XTuner's QLoRA): each layer's forward runs twice a step, the only tensors it saves are its input (to
    host memory), and the loss and every LoRA gradient are those of the model without checkpointing: the
    rebuilt forward draws the same dropout masks. The embeddings' output, which peft's enable_input_require_grads
    (XTuner calls it) makes a leaf asking for a gradient, is not kept for the backward pass: the first layer
    gets a token of no elements that asks for one in its place."""
    import gc
    import weakref

    import torch
    from peft import LoraConfig, get_peft_model

    from stages import kernels

    packed = []
    to_host = kernels._to_host

    def counted(tensor):
        packed.append(tuple(tensor.shape))
        return to_host(tensor)

    monkeypatch.setattr(kernels, "_to_host", counted)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["wqkv", "wo", "w1", "w2", "w3"])
    plain, offloaded = (get_peft_model(load(internlm2_dir), lora).train() for _ in range(2))
    offloaded.load_state_dict(plain.state_dict())
    model = offloaded.base_model.model
    calls = counted_layers(model)
    assert kernels.checkpoint_first(model, 2, offload=True) == 2
    offloaded.enable_input_require_grads()
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: embedded.append(weakref.ref(out)))
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    a = plain(input_ids=ids, labels=ids)
    torch.manual_seed(1)
    b = offloaded(input_ids=ids, labels=ids)
    hidden = (2, 16, SHAPE["hidden_size"])
    assert packed == [hidden, (0,), hidden]  # the two layers' inputs and the first one's token, nothing else
    gc.collect()
    assert embedded and embedded[0]() is None  # not held by the graph
    a.loss.backward(), b.loss.backward()
    assert calls == [2, 2]
    torch.testing.assert_close(a.loss, b.loss)
    grads = 0
    for (name, p), q in zip(plain.named_parameters(), offloaded.parameters()):
        if p.requires_grad:
            assert q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
            grads += 1
    assert grads == 2 * 5 * 2  # A and B of five adapters in each layer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("structures") / "tiny_llama"
    new_causal_lm(folder, llama_config(**SHAPE), seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


# a structure's adapted linear layers, and its MLP's first product (InternLM2's `feed_forward`, Llama's `mlp`)
ADAPTED = {"internlm2_dir": (["wqkv", "wo", "w1", "w2", "w3"], lambda layer: layer.feed_forward.w1),
           "llama_dir": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                         lambda layer: layer.mlp.gate_proj)}


@pytest.mark.parametrize("structure,offload", [("internlm2_dir", False), ("internlm2_dir", True), ("llama_dir", True)])
def test_tiled_mlps_give_the_same_gradients_in_slices_of_tokens(structure, offload, request):
    """`tile_mlp` (pipeline key `tile_mlp`, LoRA without dropout) in the checkpointed layers, with and without
    offloaded checkpoints (torch's non-reentrant and reentrant checkpoint), on InternLM2's remote code and on a
    Llama-format model: the loss and every LoRA gradient are the model's without checkpointing, the MLP never
    sees more than a slice of the tokens, and it runs forwards twice a step as a checkpointed layer's does, the
    layer's second forward leaving it out; under bf16 autocast, the same within bf16's rounding."""
    from stages.xtuner_api import patch_stack

    patch_stack()  # as the train stage runs: transformers' image utilities import torchvision's C ops otherwise
    import torch
    from peft import LoraConfig, get_peft_model

    from stages import kernels

    targets, first_product = ADAPTED[structure]
    folder = request.getfixturevalue(structure)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    plain, tiled = (get_peft_model(load(folder), lora).train() for _ in range(2))
    tiled.load_state_dict(plain.state_dict())
    model = tiled.base_model.model
    assert kernels.checkpoint_first(model, 2, offload=offload) == 2
    assert kernels.tile_mlp(model, 2, tiles=4) == 2
    tiled.enable_input_require_grads()
    seen = []
    for layer in model.model.layers:
        first_product(layer).register_forward_hook(lambda m, i, out: seen.append(i[0].shape[:-1].numel()))
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    for autocast in (False, True):
        plain.zero_grad(), tiled.zero_grad()
        seen.clear()
        tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a, b = plain(input_ids=ids, labels=ids), tiled(input_ids=ids, labels=ids)
        a.loss.backward(), b.loss.backward()
        assert seen == [8] * (4 * 2 * 2)  # 32 tokens in 4 slices, forwards and in the backward pass, two layers
        torch.testing.assert_close(a.loss, b.loss, **tol)
        grads = 0
        for (name, p), q in zip(plain.named_parameters(), tiled.parameters()):
            if p.requires_grad:
                assert q.grad is not None, name
                torch.testing.assert_close(p.grad, q.grad, msg=name, **tol)
                grads += 1
        assert grads == 2 * len(targets) * 2  # A and B of each adapter in each layer
    tiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, tiled(input_ids=ids).logits)


def test_checkpointing_some_layers_gives_the_same_gradients_and_rebuilds_only_those(internlm2_dir):
    """InternLM2's own all-layer checkpointing switched on (as XTuner does), then `checkpoint_first`
    of one of two layers: that layer's forward runs twice a step, the other's once, and the loss and
    every gradient are those of the model without checkpointing."""
    import torch

    from stages.kernels import checkpoint_first

    plain, some = load(internlm2_dir).train(), load(internlm2_dir).train()
    some.gradient_checkpointing_enable()
    calls = counted_layers(some)
    assert checkpoint_first(some, 1) == 1
    ids = torch.randint(3, SHAPE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = plain(input_ids=ids, labels=ids), some(input_ids=ids, labels=ids)
    a.loss.backward(), b.loss.backward()
    assert calls == [2, 1] and some.model.gradient_checkpointing is False
    torch.testing.assert_close(a.loss, b.loss)
    for (name, p), q in zip(plain.named_parameters(), some.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    some.eval()
    with torch.no_grad():
        some(input_ids=ids)
    assert calls == [3, 2]  # evaluation: no checkpoint

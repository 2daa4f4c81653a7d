import dataclasses
import hashlib
import json

import pytest

from stages import base, params as P
from tests.conftest import ROOT


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny():
    return P.load(ROOT / "params.yaml").stand_in.llm


def test_same_params_same_bytes(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the corpus is data/raw of the project
    # 20 pretraining steps, not the default's 200: the same code path (init, tokenizer, the seeded one-thread
    # pretraining, the save), a tenth of the CPU time (the default's 200-step build runs in the built project)
    tiny = dataclasses.replace(tiny, pretrain_steps=20)
    base.build(tiny, tmp_path / "a")
    base.build(tiny, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "tokenization_internlm2.py"} <= set(digest(tmp_path / "a"))


def test_loads_back_with_auto_classes_and_chats(built):
    from stages.xtuner_api import patch_stack

    patch_stack()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built / "models/assistant/llm"
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    assert type(tok).__name__ == "InternLM2Tokenizer" and type(tok).__module__.startswith("transformers_modules.")
    assert json.loads((path / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0] == \
        "tokenization_internlm2.InternLM2Tokenizer"  # as internlm2-chat's
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(model).__name__ == "InternLM2ForCausalLM"  # through the directory's own remote code
    assert type(model).__module__.startswith("transformers_modules.")
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    for special in ("<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "你是谁"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|im_start|>user\n你是谁<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("你好，世界", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "你好，世界"
    rare = tok("𝔘😀", add_special_tokens=False)["input_ids"]  # not in the text: byte fallback pieces
    assert all(t.startswith("<0x") for t in tok.convert_ids_to_tokens(rare)) and tok.decode(rare) == "𝔘😀"
    assert "token_type_ids" not in tok("hi")
    out = model.generate(**tok(text, return_tensors="pt", add_special_tokens=False), max_new_tokens=3,
                         do_sample=False)
    assert out.shape[1] > len(tok(text, add_special_tokens=False)["input_ids"])


def test_shape_follows_params(built):
    import json

    config = json.loads((built / "models/assistant/llm/config.json").read_text())
    tiny = P.load(built / "params.yaml").stand_in.llm
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (
        tiny.hidden_size, tiny.num_layers, tiny.num_kv_heads)
    assert config["vocab_size"] == tiny.vocab_size
    # a directory as internlm2-chat-1_8b's: the real keys, the code files beside config.json
    assert config["architectures"] == ["InternLM2ForCausalLM"] and config["model_type"] == "internlm2"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert (config["attn_implementation"], config["rope_scaling"], config["rope_theta"], config["bias"]) == (
        "eager", {"type": "dynamic", "factor": 2.0}, 1000000, False)
    assert "_name_or_path" not in config
    assert {"modeling_internlm2.py", "configuration_internlm2.py"} <= {
        f.name for f in (built / "models/assistant/llm").iterdir()}

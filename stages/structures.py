"""Model directories with the structures users really bring, built from the remote code that the
installed XTuner ships (never copied into this repository).

`internlm2-chat-1_8b` and `internlm2-chat-7b` are not Llama models: they load through
`trust_remote_code` from `modeling_internlm2.py` and `configuration_internlm2.py` in their own
directory (InternLM2ForCausalLM: a fused `attention.wqkv`, `feed_forward.w1/w3/w2`, `attention_norm`,
`ffn_norm`, an output head called `output`; dynamic NTK rope scaling; eager attention unless told).
XTuner 0.2.0's wheel carries the upstream files (`xtuner/_lite/modelings/internlm2/`), as it carries
InternViT's (`xtuner/_lite/modelings/internvl2/`). A directory written here looks like a downloaded
one: the code files beside `config.json`, whose keys are the real model's (`architectures`,
`auto_map`, `attn_implementation`, `rope_scaling`, `rope_theta`, `bias`), and weights in safetensors.

What differs from a download: the weights (random, or the tiny model's own pretraining), and the
tokenizer's contents. Its layout is the real one (a SentencePiece `tokenizer.model` loaded through
`tokenization_internlm2.py` and `auto_map`), but the SentencePiece model is trained on the project's
text (2,048 pieces where the real one has 92,544) and the code is the project's own
(stages/remote_code/internlm2/; XTuner does not ship InternLM2's tokenizer code), without the real
directory's fast tokenizer class.

    python -m stages.structures              # where the installed XTuner's model code is
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stages.errors import fail

# The files of each remote-code structure, by the folder of XTuner's package that ships them.
REMOTE_CODE = {
    "internlm2": ("_lite/modelings/internlm2", ("configuration_internlm2.py", "modeling_internlm2.py")),
    "intern_vit": ("_lite/modelings/internvl2", ("configuration_intern_vit.py", "modeling_intern_vit.py")),
}

INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def code_files(structure: str) -> list[Path]:
    """The installed package's files of `structure` (internlm2, intern_vit)."""
    sub, names = REMOTE_CODE[structure]
    from stages.xtuner_api import xtuner_folder

    folder = xtuner_folder() / sub
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        fail(f"{folder}: {', '.join(missing)} missing (XTuner 0.2.0 ships them; reinstall xtuner==0.2.0)")
    return [folder / n for n in names]


def copy_code(structure: str, out: Path) -> list[str]:
    """Copy `structure`'s remote-code files into the model directory `out`; their names."""
    names = []
    for path in code_files(structure):
        shutil.copy2(path, Path(out) / path.name)
        names.append(path.name)
    return names


def internlm2_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, max_position_embeddings: int, bos: int, eos: int, pad: int,
                     torch_dtype: str = "float32") -> dict:
    """config.json of an InternLM2 chat model, with internlm2-chat-1_8b's keys and fixed values
    (rope theta 1e6, dynamic NTK scaling x2, eager attention, no bias, untied output head)."""
    return {
        "architectures": ["InternLM2ForCausalLM"], "auto_map": dict(INTERNLM2_AUTO_MAP), "model_type": "internlm2",
        "attn_implementation": "eager", "bias": False, "hidden_act": "silu", "initializer_range": 0.02,
        "rms_norm_eps": 1e-5, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 1000000,
        "tie_word_embeddings": False, "use_cache": True, "pretraining_tp": 1,
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "torch_dtype": torch_dtype,
    }


def llama_config(**shape: Any) -> dict:
    """The same shape as a transformers LlamaForCausalLM (no remote code): the Llama-format case."""
    cfg = internlm2_config(**shape)
    for key in ("auto_map", "attn_implementation", "bias", "pretraining_tp", "rope_scaling"):
        cfg.pop(key)
    return {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def new_causal_lm(folder: Path, config: dict, seed: int, dtype: str = "float32", device: str = "cpu") -> Any:
    """A randomly initialised causal LM from `config` (written to `folder` as config.json, with the
    structure's code files beside it when it has remote code), built the way transformers builds a
    downloaded remote-code model: AutoConfig and AutoModelForCausalLM with trust_remote_code."""
    import json

    from stages.xtuner_api import patch_stack

    patch_stack()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config["architectures"] == ["InternLM2ForCausalLM"]:
        copy_code("internlm2", folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, torch_dtype=getattr(torch, dtype))
    return model


# The linear layers of a decoder block, by architecture: what `lora.target_modules: all-linear` means.
BLOCK_LINEARS = {
    "InternLM2ForCausalLM": ["w1", "w2", "w3", "wo", "wqkv"],
    **{arch: ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
       for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "InternLM3ForCausalLM")},
}


def lora_targets(config: dict, target_modules: Any) -> Any:
    """The module names that get adapters, as the rendered config lists them. `all-linear` is every
    linear layer of the decoder blocks and not the output head, as peft's `all-linear` means it. XTuner's
    own default (`target_modules=None`) finds the linear layers by itself and leaves out only heads named
    `lm_head` or `output_layer`: on InternLM2, whose head is `output`, it adapts the 92,544-row head too,
    which costs memory, speed, and the fused loss (the head is no longer a plain linear layer).
    Architectures not listed here keep `all-linear` for peft to resolve with the same rule."""
    if target_modules != "all-linear":
        return sorted(target_modules)
    arch = (config.get("architectures") or [None])[0]
    if config.get("model_type") == "llama":  # what it is built as (the InternVL stand-in's Llama-format LLM)
        arch = "LlamaForCausalLM"
    return list(BLOCK_LINEARS[arch]) if arch in BLOCK_LINEARS else "all-linear"


def structure_of(config: dict) -> str:
    """What a config.json describes, in words: `InternLM2 (remote code)`, `Llama`, ..."""
    arch = (config.get("architectures") or ["?"])[0]
    remote = " (remote code)" if config.get("auto_map") else ""
    return arch.removesuffix("ForCausalLM").removesuffix("Model") + remote


def attention_of(config: dict, flash_attn: bool = False) -> str:
    """The attention a training run on this config uses, as the train stage resolves it: InternLM2's
    remote code honours `attn_implementation` in config.json (eager by default) and the train stage
    switches eager to SDPA; XTuner's dispatch uses flash-attn 2 where it is installed."""
    if flash_attn:
        return "flash_attention_2 (XTuner's dispatch)"
    if config.get("architectures") == ["InternLM2ForCausalLM"]:
        found = config.get("attn_implementation") or "eager"
        return f"sdpa (config.json says {found}; the train stage switches it)" if found == "eager" else found
    return "sdpa"


def missing_code(folder: Path, config: dict) -> list[str]:
    """The remote-code files config.json's `auto_map` names that are not in the model directory."""
    names = set()
    for ref in (config.get("auto_map") or {}).values():
        for r in ref if isinstance(ref, list) else [ref]:
            if isinstance(r, str) and "--" not in r and "." in r:  # `repo--module.Class` lives elsewhere
                names.add(r.rsplit(".", 1)[0] + ".py")
    return sorted(n for n in names if not (Path(folder) / n).is_file())


def main(argv=None) -> None:
    import argparse

    argparse.ArgumentParser(prog="python -m stages.structures", description=__doc__.split("\n\n")[0]).parse_args(argv)
    for name in REMOTE_CODE:
        print(f"{name}: " + ", ".join(str(p) for p in code_files(name)))


if __name__ == "__main__":
    from stages.errors import run

    run(main)

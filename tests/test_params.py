import copy
import json
import subprocess
import sys

import pytest

from stages import params as P
from stages.errors import StageError
from tests.conftest import ROOT, env

DEFAULT = P.read_yaml(ROOT / "params.yaml")


def with_change(path: str, value=None, delete: bool = False, data: dict = DEFAULT) -> dict:
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return data


def error_of(data) -> str:
    with pytest.raises(StageError) as info:
        P.validate(data)
    return str(info.value)


def test_default_params_are_valid_and_typed():
    p = P.load(ROOT / "params.yaml")
    assert p.recipe == "assistant"
    assert isinstance(p.lora.r, int) and isinstance(p.train.lr, float)
    assert p.train.betas == (0.9, 0.999)
    with pytest.raises(AttributeError):
        p.lora.r = 8  # frozen


def test_yaml_1_2_numbers_as_dvc_reads_them(tmp_path):
    # PyYAML would read `2e-4` as a string; DVC (ruamel, YAML 1.2) reads a number. So do we.
    import re

    text = re.sub(r"\n  lr: \S+", "\n  lr: 2e-4", (ROOT / "params.yaml").read_text(encoding="utf-8"))
    assert "lr: 2e-4" in text
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    assert P.load(tmp_path / "params.yaml").train.lr == 2e-4


def test_whole_floats_become_integers():
    # JSON Schema counts 12.0 as an integer; the stages get an int (range(12.0) is a TypeError)
    p = P.validate(with_change("train.max_iters", 10.0, data=with_change("data.assistant.repeat", 12.0)))
    assert type(p.data.assistant.repeat) is int and p.data.assistant.repeat == 12
    assert type(p.train.max_iters) is int and p.train.max_iters == 10


BAD = [
    # (key, value, words the one-line error must contain)
    ("lora.rank", 8, ["lora.rank", "unknown key", "allowed: alpha, dropout, r, target_modules"]),
    ("train.lerning_rate", 1e-4, ["train.lerning_rate", "unknown key"]),
    ("data.assistant.repat", 3, ["data.assistant.repat", "did you mean 'repeat'"]),
    ("lora.r", "64", ["lora.r", "'64' (a string)", "allowed: auto or integer >= 1"]),
    ("lora.r", 0, ["lora.r", "allowed: auto or integer >= 1"]),
    ("lora.r", 8.5, ["lora.r", "allowed: auto or integer >= 1"]),
    ("lora.dropout", 1.0, ["lora.dropout", "allowed: auto or number >= 0 and < 1"]),
    ("lora.target_modules", [], ["lora.target_modules"]),
    ("train.lr", 0, ["train.lr", "allowed: auto or number > 0"]),
    ("train.lr", -1e-4, ["train.lr", "allowed: auto or number > 0"]),
    ("train.lr", "fast", ["train.lr", "'fast' (a string), allowed: auto or number > 0"]),
    ("train.warmup_iters", 1, ["train.warmup_iters", ">= 2"]),
    ("train.max_iters", 0, ["train.max_iters", "auto or integer >= 1 or null"]),
    ("train.betas", [0.9], ["train.betas", "at least 2"]),
    ("train.betas", [0.9, 1.5], ["train.betas[1]", "must be < 1"]),
    ("train.deepspeed", "zero4", ["train.deepspeed", "allowed: auto, none, zero1, zero2, zero3"]),
    ("train.device", "tpu", ["train.device", "allowed: auto, cpu, cuda"]),
    ("quant.double_quant", "yes", ["quant.double_quant", "expected a boolean"]),
    ("data.max_length", 8, ["data.max_length", "must be >= 32"]),
    ("data.assistant.repeat", 0, ["data.assistant.repeat", "must be >= 1"]),
    ("data.assistant.general_ratio", 1.0, ["data.assistant.general_ratio", "must be < 1"]),
    ("data.assistant.name", "", ["data.assistant.name", "must not be empty"]),
    ("data.llava.repeat", 0, ["data.llava.repeat", "must be >= 1"]),
    ("recipe", "alpaca", ["recipe", "allowed: assistant"]),
    ("assistant.prompts", [], ["assistant.prompts", "at least 1"]),
    ("stand_in.tiny.llm.num_heads", 10, ["stand_in.tiny.llm.num_heads", "does not divide hidden_size"]),
    ("data.assistant.general_chat", "chat.jsonl", ["data.assistant.general_chat", "outside data/raw/assistant/"]),
    ("assistant.perplexity_data", "data/raw/llava/x.jsonl", ["assistant.perplexity_data", "outside data/raw/assistant/"]),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_names_key_and_what_is_allowed(key, value, words):
    message = error_of(with_change(key, value))
    assert message.startswith("params.yaml: ")
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_key_is_named():
    assert "lora.alpha: missing" in error_of(with_change("lora.alpha", delete=True))
    assert "eval: missing" in error_of(with_change("eval", delete=True))


@pytest.mark.parametrize("changes,words", [
    ({"train.deepspeed": "zero3"}, ["train.deepspeed: zero3", "quant.mode: nf4"]),
    ({"train.nodes": 2, "train.node_rank": 2}, ["train.node_rank: 2 is not below train.nodes 2"]),
    ({"train.gpus": 2, "train.global_batch": 3}, ["train.global_batch: 3 cannot be split over 2 processes"]),
    ({"train.nodes": 2, "train.gpus": 2, "train.global_batch": 6},
     ["train.global_batch: 6 cannot be split over 4 processes (train.gpus 2 x train.nodes 2)"]),
    ({"train.device": "cpu", "train.deepspeed": "zero2"}, ["train.deepspeed: zero2 needs a GPU"]),
    ({"train.device": "cpu", "train.precision": "bf16"}, ["train.precision: bf16"]),
])
def test_contradictions_are_refused(changes, words):
    data = DEFAULT
    for key, value in changes.items():
        data = with_change(key, value, data=data)
    message = error_of(data)
    for word in words:
        assert word in message


def test_several_cpu_processes_are_allowed():
    """On a CPU, train.gpus counts processes (gloo); only a DeepSpeed stage or half precision needs a GPU."""
    data = with_change("train.gpus", 2, data=with_change("train.device", "cpu"))
    train = P.validate(with_change("train.global_batch", 2, data=data)).train
    assert (train.device, train.gpus, train.nodes, train.node_rank) == ("cpu", 2, 1, "auto")


def test_zero3_without_quantization_is_allowed():
    data = with_change("quant.mode", "none", data=with_change("train.deepspeed", "zero3"))
    assert P.validate(data).train.deepspeed == "zero3"


def test_several_errors_say_how_many_more():
    data = with_change("train.lr", 0, data=with_change("lora.r", 0))
    assert "(and 1 more)" in error_of(data)


def test_schema_is_derived_from_the_dataclasses():
    schema = P.schema()
    assert schema["properties"]["lora"]["additionalProperties"] is False
    assert schema["properties"]["lora"]["properties"]["r"] == {
        "anyOf": [{"enum": ["auto"]}, {"type": "integer", "minimum": 1}],
        "description": "LoRA rank; auto: the recipe's preset (assistant and llava 64; internvl 128, the tutorial's)"}
    assert set(schema["required"]) == {"recipe", "stand_in", "data", "lora", "quant", "train", "eval", "select", "assistant",
                                       "llava", "internvl"}


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    text = (ROOT / "params.yaml").read_text(encoding="utf-8").replace("  r: auto", "  rank: 64")
    bad = tmp_path / "params.yaml"
    bad.write_text(text, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "stages.params", str(bad)], capture_output=True, text=True,
                          env=env(), cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "lora.rank: unknown key" in proc.stderr
    assert bad.read_text(encoding="utf-8") == text  # nothing the user wrote is touched


def test_cli_schema_dump_is_json():
    proc = subprocess.run([sys.executable, "-m", "stages.params", "--schema"], capture_output=True, text=True,
                          env=env(), cwd=ROOT, check=True)
    assert json.loads(proc.stdout)["title"] == "params.yaml"


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("recipe: assistant\nlora: [\n", encoding="utf-8")
    with pytest.raises(StageError, match=r"params.yaml: line \d+ not valid YAML"):
        P.load(bad)

"""Bad input, one table: every case makes one mistake a user makes in a copy of the built project, runs
the stage that meets it first through its real entry point, and expects the contract:

- a non-zero exit, exactly one line on stderr, starting with `error:` and naming the key, file or record;
- no traceback anywhere in the output;
- the user's files (`params.yaml`, `data/raw/`) byte for byte as the case left them.

Most cases run the stage's `main` in-process through `stages.errors.run` (as `python -m` does); the cases
marked `subprocess` run `python -m stages.<name>` itself. `pre` stages run first and must succeed (a
mistake that only a later stage can see)."""
from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import assert_one_line_error, env, tree_digest

pytestmark = pytest.mark.e2e

GENERAL = "data/raw/general_chat.jsonl"
LLAVA = "data/raw/llava/unique_data.json"
IMAGE = "data/raw/llava/images/red_circle_on_white.png"
TEMPLATES = "data/raw/self_cognition.json"
MODEL = "models/tiny-internlm2"
INTERNVL = "data/raw/internvl/unique_data.json"
GENERATED = "data/generated/self_cognition.jsonl"


# ---------------------------------------------------------------------------------------------
# edits: each returns a function that makes one mistake in the project folder


def param(old: str, new: str) -> Callable[[Path], None]:
    """Replace `old` (found exactly once) in params.yaml, as a user edits it."""
    def edit(project: Path) -> None:
        path = project / "params.yaml"
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{old!r} is not in params.yaml exactly once"
        path.write_text(text.replace(old, new), encoding="utf-8")
    return edit


def params_bytes(make: Callable[[str], bytes]) -> Callable[[Path], None]:
    """Rewrite params.yaml as `make(its text)` returns it."""
    def edit(project: Path) -> None:
        path = project / "params.yaml"
        path.write_bytes(make(path.read_text(encoding="utf-8")))
    return edit


def params_sub(pattern: str, repl: str) -> Callable[[Path], None]:
    """Replace the one match of a regular expression in params.yaml (an edit over several lines)."""
    def edit(project: Path) -> None:
        path = project / "params.yaml"
        text, n = re.subn(pattern, repl, path.read_text(encoding="utf-8"))
        assert n == 1, f"{pattern!r} does not match params.yaml once"
        path.write_text(text, encoding="utf-8")
    return edit


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(project: Path) -> None:
        path = project / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return edit


def append(name: str, line: str) -> Callable[[Path], None]:
    def edit(project: Path) -> None:
        path = project / name
        path.write_text(path.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    return edit


def remove(name: str) -> Callable[[Path], None]:
    def edit(project: Path) -> None:
        (project / name).unlink()
    return edit


def llava(mutate: Callable[[list], object], source: str = LLAVA) -> Callable[[Path], None]:
    """Change the LLaVA source records (a list of dicts) and write them back."""
    def edit(project: Path) -> None:
        path = project / source
        records = json.loads(path.read_text(encoding="utf-8"))
        mutate(records)
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return edit


def recode(name: str, encoding: str) -> Callable[[Path], None]:
    """Save a text file in another encoding (a Chinese Windows editor's GB18030, say)."""
    def edit(project: Path) -> None:
        path = project / name
        path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))
    return edit


def pretrained_pth_running_code(project: Path) -> None:
    """The llava recipe with a downloaded `iter_2181.pth` whose pickle would write data/raw/ran_code.txt
    (the table's check of data/raw proves it never ran)."""
    from tests.test_xtuner_api import crafted_pth

    crafted_pth(project / "iter_2181.pth", project / "data/raw/ran_code.txt")
    param("recipe: assistant ", "recipe: llava     ")(project)
    param("  pretrained_pth:     ", "  pretrained_pth: iter_2181.pth")(project)


def conv(*turns: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}, ensure_ascii=False)


def turn(i: int, **changes) -> Callable[[list], None]:
    """Change turn `i` of a LLaVA record: turn(1, value="...")(records[3])."""
    return lambda rec: rec["conversations"][i].update(changes)


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Case:
    id: str
    stage: str  # the stage that meets the mistake first: stages.<stage>
    edit: Callable[[Path], None]
    needles: tuple[str, ...]  # each must be in the error line
    subprocess: bool = False  # run `python -m stages.<stage>` rather than its main in-process
    pre: tuple[str, ...] = ()  # stages that run first and must succeed


LONG = conv(("user", "长" * 400), ("assistant", "好"))
R64 = "\n  r: auto"

CASES = [
    # params.yaml: unknown keys
    Case("params-unknown-key", "render", param(R64, "\n  rank: 64"),
         ("params.yaml: lora.rank: unknown key", "allowed: alpha, dropout, r, target_modules")),
    Case("params-typo-suggests-key", "generate", param("  repeat: 12 ", "  repat: 12 "),
         ("params.yaml: data.repat: unknown key", "did you mean 'repeat'")),
    Case("params-unknown-section", "doctor", param("\nlora:  ", "\ntrainer:\n  lr: 0.1\n\nlora:  "),
         ("params.yaml: trainer: unknown key",), subprocess=True),
    Case("params-missing-key", "render", param("  alpha: auto\n", ""), ("params.yaml: lora.alpha: missing",)),
    # wrong types
    Case("params-string-for-int", "render", param(R64, '\n  r: "64"'),
         ("lora.r: got '64' (a string), allowed: auto or integer >= 1",)),
    Case("params-yaml11-yes-for-bool", "render", param("double_quant: true", "double_quant: yes"),
         ("quant.double_quant: got 'yes' (a string), expected a boolean",)),
    Case("params-fraction-for-int", "render", param("epochs: 3", "epochs: 2.5"),
         ("train.epochs: got 2.5, expected an integer",)),
    Case("params-string-for-list", "render", params_sub(r"  prompts:.*\n(  - .*\n)+", "  prompts: 你是谁\n"),
         ("eval.prompts: got '你是谁' (a string), expected an array",)),
    Case("params-list-for-string", "generate", param("author: 青衫", "author: [青衫]"),
         ("data.author: got a list, expected a string",)),
    # out of range
    Case("params-dropout-1", "render", param("  dropout: auto", "  dropout: 1.0"),
         ("lora.dropout: got 1.0, allowed: auto or number >= 0 and < 1",)),
    Case("params-lr-0", "render", param("lr: 0.004", "lr: 0"), ("train.lr: got 0, must be > 0",)),
    Case("params-lr-inf", "render", param("lr: 0.004", "lr: .inf"), ("train.lr: got inf, expected a finite number",)),
    Case("params-beta-1.5", "render", param("  - 0.999", "  - 1.5"), ("train.betas[1]: got 1.5, must be < 1",)),
    Case("params-max-length-8", "validate", param("max_length: 256", "max_length: 8"),
         ("data.max_length: got 8, must be >= 32",)),
    Case("params-general-ratio-1", "generate", param("general_ratio: 0.2", "general_ratio: 1.0"),
         ("data.general_ratio: got 1.0, must be < 1",)),
    Case("params-llava-repeat-0", "repeat", param("repeat: 20                 # the", "repeat: 0                 # the"),
         ("data.llava.repeat: got 0, must be >= 1",)),
    Case("params-vocab-too-small", "base", param("vocab_size: 2048", "vocab_size: 100"),
         ("model.tiny.vocab_size: got 100, must be >= 320",)),
    # bad enum values
    Case("params-deepspeed-zero4", "render", param("deepspeed: auto", "deepspeed: zero4"),
         ("train.deepspeed: got 'zero4' (a string), allowed: auto, none, zero1, zero2, zero3",)),
    Case("params-quant-int8", "render", param("mode: nf4", "mode: int8"), ("quant.mode", "allowed: nf4, fp4, none")),
    Case("params-overlong-ignore", "validate", param("overlong: error", "overlong: ignore"),
         ("data.overlong", "allowed: error, drop, truncate")),
    Case("params-recipe-alpaca", "render", param("recipe: assistant", "recipe: alpaca"), ("recipe", "allowed: assistant")),
    # contradictions
    Case("params-zero3-with-4bit", "render", param("deepspeed: auto", "deepspeed: zero3"),
         ("train.deepspeed: zero3 cannot shard 4-bit weights (quant.mode: nf4)",)),
    Case("params-cpu-with-2-gpus", "render", params_bytes(
        lambda t: t.replace("device: auto", "device: cpu").replace("gpus: 1", "gpus: 2").encode()),
         ("train.gpus: 2 GPUs with train.device: cpu",)),
    Case("params-cpu-with-deepspeed", "render", params_bytes(
        lambda t: t.replace("device: auto", "device: cpu").replace("deepspeed: auto", "deepspeed: zero2").encode()),
         ("train.deepspeed: zero2 needs a GPU (train.device is cpu)",)),
    Case("params-cpu-with-bf16", "render", params_bytes(
        lambda t: t.replace("device: auto", "device: cpu").replace("precision: auto", "precision: bf16").encode()),
         ("train.precision: bf16 mixed precision needs a GPU",)),
    Case("params-max-length-over-positions", "validate", param("max_length: 256", "max_length: 2048"),
         ("data.max_length: 2048 exceeds model.tiny.max_position_embeddings 1024",)),
    Case("params-vocab-below-characters", "base", param("vocab_size: 2048", "vocab_size: 600"),
         ("model.tiny.vocab_size: 600: SentencePiece cannot train on the project's text",
          "Vocabulary size is smaller than required_chars")),
    Case("eval-prompts-truncated", "base", write("data/raw/eval_prompts.json", '{"identity": ["你是谁"'),
         ("data/raw/eval_prompts.json: line 1 column", "not valid JSON")),
    Case("base-corpus-file-missing", "base", remove("data/raw/general_heldout.jsonl"),
         ("data/raw/general_heldout.jsonl: missing",)),
    Case("params-heads-do-not-divide", "base", param("num_heads: 4", "num_heads: 3"),
         ("model.tiny.num_heads: 3 does not divide hidden_size 64",)),
    # params.yaml as a file
    Case("params-yaml-syntax", "params", param(R64, "\n  r: [64"), ("params.yaml: line", "not valid YAML"),
         subprocess=True),
    Case("params-yaml-tab", "validate", param(R64, "\n\tr: 64"), ("params.yaml: line", "not valid YAML", "'\\t'")),
    Case("params-yaml-duplicate-key", "render", param(R64, R64 + "\n  r: 32"),
         ("params.yaml: line", "duplicate key \"r\"")),
    Case("params-not-utf8", "generate", recode("params.yaml", "gb18030"), ("params.yaml: not UTF-8 text (byte",),
         subprocess=True),
    Case("params-empty", "validate", write("params.yaml", ""), ("params.yaml: expected a mapping of sections, got null",)),
    Case("params-a-list", "repeat", write("params.yaml", "- recipe: assistant\n"),
         ("params.yaml: expected a mapping of sections, got a list",)),

    # general conversations (OpenAI messages, JSON Lines): met by generate
    Case("chat-malformed-json", "generate", append(GENERAL, '{"messages": [{"role": "user", "content": "hi"}'),
         (GENERAL, "line 81", "not valid JSON"), subprocess=True),
    Case("chat-alpaca-format", "generate", append(GENERAL, '{"instruction": "hi", "output": "x"}'),
         (GENERAL, "[80] messages: missing")),
    Case("chat-wrong-key", "generate", append(GENERAL, '{"conversation": []}'), (GENERAL, "[80] messages: missing")),
    Case("chat-not-an-object", "generate", append(GENERAL, '"hello"'), (GENERAL, "[80]", "expected object, got str")),
    Case("chat-empty", "generate", write(GENERAL, "\n\n"), (GENERAL, "the dataset is empty")),
    Case("chat-unknown-role", "generate", append(GENERAL, conv(("user", "hi"), ("robot", "x"))),
         (GENERAL, "[80] messages[1].role", "'robot' is not one of system, user, assistant")),
    Case("chat-roles-do-not-alternate", "generate", append(GENERAL, conv(("user", "hi"), ("user", "x"))),
         (GENERAL, "[80] messages[1].role", "roles alternate")),
    Case("chat-ends-with-user", "generate", append(GENERAL, conv(("user", "a"), ("assistant", "b"), ("user", "c"))),
         (GENERAL, "[80] messages", "ends with a user turn")),
    Case("chat-empty-content", "generate", append(GENERAL, conv(("user", ""), ("assistant", "x"))),
         (GENERAL, "[80] messages[0].content: empty")),
    Case("chat-number-content", "generate", append(GENERAL, conv(("user", 5), ("assistant", "x"))),
         (GENERAL, "[80] messages[0].content", "expected string")),
    Case("chat-not-utf8", "generate", recode(GENERAL, "gb18030"), (GENERAL, "not UTF-8 text (byte")),
    Case("chat-file-missing", "generate", param("general_chat: data/raw/general_chat.jsonl", "general_chat: chat.jsonl"),
         ("chat.jsonl: not found", "data.general_chat")),
    Case("chat-overlong", "validate", append(GENERAL, LONG),
         (GENERATED, "1 bad record", "> data.max_length 256", "data.overlong"), pre=("generate",)),
    Case("overlong-for-max-length", "validate", param("max_length: 256", "max_length: 32"),
         (GENERATED, "bad records", "tokens > data.max_length 32", "data.overlong")),
    # question and answer templates: met by generate
    Case("templates-unknown-placeholder", "generate", write(TEMPLATES, '{"questions": ["q"], "answers": ["I am {nmae}"]}'),
         (TEMPLATES, "answers[0]", "unknown placeholder {nmae}")),
    Case("templates-no-questions", "generate", write(TEMPLATES, '{"questions": [], "answers": ["a"]}'),
         (TEMPLATES, "questions", "non-empty list")),
    Case("templates-blank-answer", "generate", write(TEMPLATES, '{"questions": ["q"], "answers": [" "]}'),
         (TEMPLATES, "answers[0]", "non-empty string")),
    Case("templates-lone-brace", "generate", write(TEMPLATES, '{"questions": ["q {"], "answers": ["a"]}'),
         (TEMPLATES, "questions[0]", "write a literal brace as {{ or }}")),
    Case("templates-no-answers", "generate", write(TEMPLATES, '{"questions": ["q"]}'),
         (TEMPLATES, "exactly the keys 'questions' and 'answers'")),
    Case("templates-trailing-comma", "generate", write(TEMPLATES, '{"questions": ["q"], "answers": ["a"],}'),
         (TEMPLATES, "line 1", "not valid JSON")),
    Case("templates-a-folder", "generate", param("templates: data/raw/self_cognition.json", "templates: data/raw/llava"),
         ("data/raw/llava: cannot be read", "the self-cognition templates")),

    # LLaVA source (data/raw/llava): met by repeat
    Case("llava-malformed-json", "repeat", write(LLAVA, '[{"id": "0", "conversations": [}]'),
         (LLAVA, "line 1", "not valid JSON"), subprocess=True),
    Case("llava-utf8-bom", "repeat", lambda p: (p / LLAVA).write_bytes(b"\xef\xbb\xbf" + (p / LLAVA).read_bytes()),
         (LLAVA, "line 1 column 1", "BOM")),
    Case("llava-not-a-list", "repeat", write(LLAVA, '{"id": 1}'), (LLAVA, "expected a list of records, got dict")),
    Case("llava-empty", "repeat", llava(lambda rs: rs.clear()), (LLAVA, "the dataset is empty")),
    Case("llava-missing-image", "repeat", llava(lambda rs: rs[2].update(image="images/missing.png")),
         (LLAVA, "[2] image", "images/missing.png", "not found")),
    Case("llava-deleted-image", "repeat", remove(IMAGE), (LLAVA, "[0] image", "red_circle_on_white.png", "not found")),
    Case("llava-corrupt-image", "repeat", write(IMAGE, b"\x89PNG\r\n\x1a\nbroken"),
         (LLAVA, "red_circle_on_white.png", "does not decode")),
    Case("llava-text-as-image", "repeat", write(IMAGE, "not an image\n"),
         (LLAVA, "red_circle_on_white.png", "does not decode")),
    Case("llava-image-folder-wrong", "repeat", param("image_folder: data/raw/llava", "image_folder: data/raw"),
         (LLAVA, "bad records", "not found in the image folder")),
    Case("llava-no-image-token", "repeat", llava(lambda rs: turn(0, value="no image token")(rs[1])),
         (LLAVA, "[1] conversations", "0 <image> tokens")),
    Case("llava-two-image-tokens", "repeat", llava(lambda rs: turn(0, value="<image>\n<image>\ntwice")(rs[0])),
         (LLAVA, "[0] conversations", "2 <image> tokens")),
    Case("llava-token-without-image", "repeat", llava(lambda rs: rs[0].pop("image")),
         (LLAVA, "[0] conversations", "<image> in a sample without an image")),
    Case("llava-wrong-turn-order", "repeat", llava(lambda rs: turn(1, **{"from": "human"})(rs[3])),
         (LLAVA, "[3] conversations[1].from", "turns alternate")),
    Case("llava-unknown-speaker", "repeat", llava(lambda rs: turn(1, **{"from": "assistant"})(rs[3])),
         (LLAVA, "[3] conversations[1].from", "'assistant' is not one of human, gpt")),
    Case("llava-empty-value", "repeat", llava(lambda rs: turn(1, value="  ")(rs[4])),
         (LLAVA, "[4] conversations[1].value: empty")),
    Case("llava-missing-conversations", "repeat", llava(lambda rs: rs[5].pop("conversations")),
         (LLAVA, "[5] conversations: missing")),

    # the internvl recipe: its params, its CLoT-style records (met by repeat), its model directory
    Case("params-internvl-downsample", "internvl", param("downsample_ratio: 0.5", "downsample_ratio: 0.3"),
         ("internvl.tiny.downsample_ratio: 0.3 must be 1/k with k dividing the 8 x 8 patch grid",)),
    Case("params-internvl-empty-prompt", "render", param("eval_prompt: 请你根据这张图片，讲一个脑洞大开的梗", "eval_prompt: ''"),
         ("internvl.eval_prompt: must not be empty",)),
    Case("params-internvl-lora-section", "render", param("\ninternvl:  ", "\ninternvl:\n  lora:\n    r: 128\n "),
         ("internvl.lora: unknown key",)),
    Case("internvl-missing-image", "repeat", llava(lambda rs: rs[2].update(image="images/cat.jpg"), INTERNVL),
         (INTERNVL, "[2] image", "images/cat.jpg", "not found")),
    Case("internvl-two-images", "repeat",
         llava(lambda rs: turn(0, value="<image>\n<image>\n讲个梗")(rs[1]), INTERNVL),
         (INTERNVL, "[1] conversations", "2 <image> tokens")),
    Case("internvl-path-not-a-directory", "validate", param("path: models/tiny-internvl", "path: models/InternVL2-2B"),
         ("internvl.path: models/InternVL2-2B is not a directory", "download the model")),
    Case("internvl-path-not-internvl", "validate", write("models/tiny-internvl/config.json", '{"model_type": "llama"}'),
         ("internvl.path: models/tiny-internvl/config.json lacks InternVL's 'force_image_size'",)),

    # a downloaded checkpoint: met by pretrain (the llava recipe's llava.pretrained_pth)
    Case("pretrained-pth-runs-code", "pretrain", pretrained_pth_running_code,
         ("llava.pretrained_pth: iter_2181.pth: refused: its pickle would call builtins.exec", "nothing in it ran"),
         subprocess=True),

    # the base model directory: met by validate (its tokenizer counts the tokens)
    Case("model-not-a-directory", "validate", param("path: models/tiny-internlm2", "path: models/internlm2-chat-1_8b"),
         ("model.path: models/internlm2-chat-1_8b is not a directory", "download the model"), subprocess=True),
    Case("model-without-tokenizer", "validate", remove(f"{MODEL}/tokenizer.model"),
         ("model.path: models/tiny-internlm2 has no tokenizer",)),
    Case("model-without-weights", "validate", remove(f"{MODEL}/model.safetensors"),
         ("model.path: models/tiny-internlm2 has no weights",)),
    Case("model-without-config", "validate", remove(f"{MODEL}/config.json"),
         ("model.path: models/tiny-internlm2 has no config.json",)),
    Case("model-truncated-tokenizer", "validate", write(f"{MODEL}/tokenizer.model", "\n\x0e\n\x05<unk>"),
         ("model.path: the tokenizer in models/tiny-internlm2 does not load",)),
    Case("model-tokenizer-without-code", "validate", remove(f"{MODEL}/tokenization_internlm2.py"),
         ("model.path: models/tiny-internlm2 lacks tokenization_internlm2.py, the remote code its "
          "tokenizer_config.json names",)),
    Case("model-truncated-tokenizer-config", "validate", write(f"{MODEL}/tokenizer_config.json", '{"auto_map": {'),
         ("model.path: models/tiny-internlm2/tokenizer_config.json: not valid JSON",)),
    Case("model-truncated-config", "validate", write(f"{MODEL}/config.json", '{"architectures": ['),
         ("model.path: models/tiny-internlm2/config.json: not valid JSON",)),
    Case("prompt-template-unknown", "validate", param("prompt_template: internlm2_chat", "prompt_template: internlm3_chat"),
         ("train.prompt_template: 'internlm3_chat' is not an XTuner template",)),
]


def user_files(project: Path) -> dict:
    """What the user owns: params.yaml and data/raw/, path -> bytes."""
    params = project / "params.yaml"
    return {"params.yaml": params.read_bytes() if params.exists() else None,
            **{f"data/raw/{k}": v for k, v in tree_digest(project / "data/raw").items()}}


def run_in_process(stage: str, capsys) -> tuple[int, str, str]:
    """`python -m stages.<stage>` without a new interpreter: its main through `stages.errors.run`."""
    from stages.errors import run

    module = importlib.import_module(f"stages.{stage}")
    capsys.readouterr()
    try:
        run(module.main, [])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(stage: str, project: Path) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env(), capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_the_table_is_wide_enough():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(project, capsys, case):
    case.edit(project)
    before = user_files(project)
    for stage in case.pre:
        code, out, err = run_in_process(stage, capsys)
        assert code == 0, f"{stage} should pass: {err}"
    code, out, err = run_subprocess(case.stage, project) if case.subprocess else run_in_process(case.stage, capsys)
    assert_one_line_error(code, err, *case.needles)
    assert "Traceback" not in out + err
    assert user_files(project) == before, "a stage changed the user's files"

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

from tests.conftest import assert_one_line_error, copy_project, env, tree_digest

pytestmark = pytest.mark.e2e

GENERAL = "data/raw/assistant/general_chat.jsonl"
LLAVA = "data/raw/llava/unique_data.json"
IMAGE = "data/raw/llava/images/red_circle_on_white.png"
TEMPLATES = "data/raw/assistant/self_cognition.json"
MODEL = "models/assistant/llm"
INTERNVL = "data/raw/internvl/unique_data.json"
GENERATED = "data/generated/assistant/self_cognition.jsonl"


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


def as_recipe(recipe: str, *edits: Callable[[Path], None]) -> Callable[[Path], None]:
    """The project switched to `recipe` (as `dvc exp run -S recipe=...` does), then `edits`."""
    def edit(project: Path) -> None:
        param("\nrecipe: assistant ", f"\nrecipe: {recipe:<10}")(project)
        for e in edits:
            e(project)
    return edit


def remove_tree(name: str) -> Callable[[Path], None]:
    def edit(project: Path) -> None:
        import shutil

        shutil.rmtree(project / name)
    return edit


def copy_tree(src: str, dest: str) -> Callable[[Path], None]:
    def edit(project: Path) -> None:
        import shutil

        shutil.copytree(project / src, project / dest)
    return edit


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
    Case("params-typo-suggests-key", "prepare", param("  repeat: 12 ", "  repat: 12 "),
         ("params.yaml: data.assistant.repat: unknown key", "did you mean 'repeat'")),
    Case("params-unknown-section", "doctor", param("\nlora:  ", "\ntrainer:\n  lr: 0.1\n\nlora:  "),
         ("params.yaml: trainer: unknown key",), subprocess=True),
    Case("params-missing-key", "render", param("  alpha: auto\n", ""), ("params.yaml: lora.alpha: missing",)),
    # wrong types
    Case("params-string-for-int", "render", param(R64, '\n  r: "64"'),
         ("lora.r: got '64' (a string), allowed: auto or integer >= 1",)),
    Case("params-yaml11-yes-for-bool", "render", param("double_quant: true", "double_quant: yes"),
         ("quant.double_quant: got 'yes' (a string), expected a boolean",)),
    Case("params-fraction-for-int", "render", param("epochs: 4", "epochs: 2.5"),
         ("train.epochs: got 2.5, expected an integer",)),
    Case("params-string-for-list", "render", params_sub(r"  prompts:.*\n(  - .*\n)+", "  prompts: 你是谁\n"),
         ("assistant.prompts: got '你是谁' (a string), expected an array",)),
    Case("params-list-for-string", "prepare", param("author: 青衫", "author: [青衫]"),
         ("data.assistant.author: got a list, expected a string",)),
    # out of range
    Case("params-dropout-1", "render", param("  dropout: auto", "  dropout: 1.0"),
         ("lora.dropout: got 1.0, allowed: auto or number >= 0 and < 1",)),
    Case("params-lr-0", "render", param("  lr: auto ", "  lr: 0 "), ("train.lr: got 0, allowed: auto or number > 0",)),
    Case("params-lr-inf", "render", param("  lr: auto ", "  lr: .inf "), ("train.lr: got inf, expected a finite number",)),
    Case("params-beta-1.5", "render", param("  - 0.999", "  - 1.5"), ("train.betas[1]: got 1.5, must be < 1",)),
    Case("params-max-length-8", "validate", param("max_length: 256", "max_length: 8"),
         ("data.max_length: got 8, must be >= 32",)),
    Case("params-general-ratio-1", "prepare", param("general_ratio: 0.35", "general_ratio: 1.0"),
         ("data.assistant.general_ratio: got 1.0, must be < 1",)),
    Case("params-llava-repeat-0", "prepare", param("repeat: 20                 # the", "repeat: 0                 # the"),
         ("data.llava.repeat: got 0, must be >= 1",)),
    Case("params-vocab-too-small", "stand_in", param("vocab_size: 2048", "vocab_size: 100"),
         ("stand_in.tiny.llm.vocab_size: got 100, must be >= 320",)),
    # bad enum values
    Case("params-deepspeed-zero4", "render", param("deepspeed: auto", "deepspeed: zero4"),
         ("train.deepspeed: got 'zero4' (a string), allowed: auto, none, zero1, zero2, zero3",)),
    Case("params-quant-int8", "render", param("mode: nf4", "mode: int8"), ("quant.mode", "allowed: nf4, fp4, none")),
    Case("params-overlong-ignore", "validate", param("overlong: error", "overlong: ignore"),
         ("data.overlong", "allowed: error, drop, truncate")),
    Case("params-recipe-alpaca", "render", param("\nrecipe: assistant", "\nrecipe: alpaca"), ("recipe", "allowed: assistant")),
    # contradictions
    Case("params-zero3-with-4bit", "render", param("deepspeed: auto", "deepspeed: zero3"),
         ("train.deepspeed: zero3 cannot shard 4-bit weights (quant.mode: nf4)",)),
    Case("params-node-rank-beyond-nodes", "render", param("node_rank: auto", "node_rank: 1"),
         ("train.node_rank: 1 is not below train.nodes 1",)),
    Case("params-cpu-with-deepspeed", "render", params_bytes(
        lambda t: t.replace("device: auto", "device: cpu").replace("deepspeed: auto", "deepspeed: zero2").encode()),
         ("train.deepspeed: zero2 needs a GPU (train.device is cpu)",)),
    Case("params-cpu-with-bf16", "render", params_bytes(
        lambda t: t.replace("device: auto", "device: cpu").replace("precision: auto", "precision: bf16").encode()),
         ("train.precision: bf16 mixed precision needs a GPU",)),
    Case("params-max-length-over-positions", "validate", param("max_length: 256", "max_length: 2048"),
         ("data.max_length: 2048 exceeds stand_in.tiny.llm.max_position_embeddings 1024",)),
    Case("params-vocab-below-characters", "stand_in", param("vocab_size: 2048", "vocab_size: 600"),
         ("stand_in.tiny.llm.vocab_size: 600: SentencePiece cannot train on the project's text",
          "Vocabulary size is smaller than required_chars")),
    Case("eval-prompts-truncated", "stand_in", write("data/raw/assistant/eval_prompts.json", '{"identity": ["你是谁"'),
         ("data/raw/assistant/eval_prompts.json: line 1 column", "not valid JSON")),
    Case("base-corpus-file-missing", "stand_in", remove("data/raw/assistant/general_heldout.jsonl"),
         ("data/raw/assistant/general_heldout.jsonl: missing",)),
    Case("params-heads-do-not-divide", "stand_in", param("num_heads: 4", "num_heads: 10"),
         ("stand_in.tiny.llm.num_heads: 10 does not divide hidden_size 192",)),
    Case("params-recipe-file-elsewhere", "prepare", param("general_chat: data/raw/assistant/general_chat.jsonl",
                                                          "general_chat: chat.jsonl"),
         ("data.assistant.general_chat: chat.jsonl is outside data/raw/assistant/", "put the file there")),
    Case("params-pretrained-pth-elsewhere", "train", as_recipe("llava", param("  pretrained_pth:     ",
                                                                             "  pretrained_pth: iter_2181.pth")),
         ("llava.pretrained_pth: iter_2181.pth is outside models/llava/",), subprocess=True),  # train re-executes itself
    # params.yaml as a file
    Case("params-yaml-syntax", "params", param(R64, "\n  r: [64"), ("params.yaml: line", "not valid YAML"),
         subprocess=True),
    Case("params-yaml-tab", "validate", param(R64, "\n\tr: 64"), ("params.yaml: line", "not valid YAML", "'\\t'")),
    Case("params-yaml-duplicate-key", "render", param(R64, R64 + "\n  r: 32"),
         ("params.yaml: line", "duplicate key \"r\"")),
    Case("params-not-utf8", "prepare", recode("params.yaml", "gb18030"), ("params.yaml: not UTF-8 text (byte",),
         subprocess=True),
    Case("params-empty", "validate", write("params.yaml", ""), ("params.yaml: expected a mapping of sections, got null",)),
    Case("params-a-list", "prepare", write("params.yaml", "- recipe: assistant\n"),
         ("params.yaml: expected a mapping of sections, got a list",)),

    # general conversations (OpenAI messages, JSON Lines): met by prepare
    Case("chat-malformed-json", "prepare", append(GENERAL, '{"messages": [{"role": "user", "content": "hi"}'),
         (GENERAL, "line 81", "not valid JSON"), subprocess=True),
    Case("chat-alpaca-format", "prepare", append(GENERAL, '{"instruction": "hi", "output": "x"}'),
         (GENERAL, "[80] messages: missing")),
    Case("chat-wrong-key", "prepare", append(GENERAL, '{"conversation": []}'), (GENERAL, "[80] messages: missing")),
    Case("chat-not-an-object", "prepare", append(GENERAL, '"hello"'), (GENERAL, "[80]", "expected object, got str")),
    Case("chat-empty", "prepare", write(GENERAL, "\n\n"), (GENERAL, "the dataset is empty")),
    Case("chat-unknown-role", "prepare", append(GENERAL, conv(("user", "hi"), ("robot", "x"))),
         (GENERAL, "[80] messages[1].role", "'robot' is not one of system, user, assistant")),
    Case("chat-roles-do-not-alternate", "prepare", append(GENERAL, conv(("user", "hi"), ("user", "x"))),
         (GENERAL, "[80] messages[1].role", "roles alternate")),
    Case("chat-ends-with-user", "prepare", append(GENERAL, conv(("user", "a"), ("assistant", "b"), ("user", "c"))),
         (GENERAL, "[80] messages", "ends with a user turn")),
    Case("chat-empty-content", "prepare", append(GENERAL, conv(("user", ""), ("assistant", "x"))),
         (GENERAL, "[80] messages[0].content: empty")),
    Case("chat-number-content", "prepare", append(GENERAL, conv(("user", 5), ("assistant", "x"))),
         (GENERAL, "[80] messages[0].content", "expected string")),
    Case("chat-not-utf8", "prepare", recode(GENERAL, "gb18030"), (GENERAL, "not UTF-8 text (byte")),
    Case("chat-file-missing", "prepare", remove(GENERAL), (GENERAL + ": not found", "data.assistant.general_chat")),
    Case("chat-overlong", "validate", append(GENERAL, LONG),
         (GENERATED, "bad record", "> data.max_length 256", "data.overlong"), pre=("prepare",)),  # as often as mixed in
    Case("overlong-for-max-length", "validate", param("max_length: 256", "max_length: 32"),
         (GENERATED, "bad records", "tokens > data.max_length 32", "data.overlong")),
    # question and answer templates: met by prepare
    Case("templates-unknown-placeholder", "prepare", write(TEMPLATES, '{"questions": ["q"], "answers": ["I am {nmae}"]}'),
         (TEMPLATES, "answers[0]", "unknown placeholder {nmae}")),
    Case("templates-no-questions", "prepare", write(TEMPLATES, '{"questions": [], "answers": ["a"]}'),
         (TEMPLATES, "questions", "non-empty list")),
    Case("templates-blank-answer", "prepare", write(TEMPLATES, '{"questions": ["q"], "answers": [" "]}'),
         (TEMPLATES, "answers[0]", "non-empty string")),
    Case("templates-lone-brace", "prepare", write(TEMPLATES, '{"questions": ["q {"], "answers": ["a"]}'),
         (TEMPLATES, "questions[0]", "write a literal brace as {{ or }}")),
    Case("templates-no-answers", "prepare", write(TEMPLATES, '{"questions": ["q"]}'),
         (TEMPLATES, "exactly the keys 'questions' and 'answers'")),
    Case("templates-trailing-comma", "prepare", write(TEMPLATES, '{"questions": ["q"], "answers": ["a"],}'),
         (TEMPLATES, "line 1", "not valid JSON")),
    Case("templates-a-folder", "prepare", param("templates: data/raw/assistant/self_cognition.json",
                                                "templates: data/raw/assistant"),
         ("data/raw/assistant: cannot be read", "the self-cognition templates")),

    # LLaVA source (data/raw/llava): met by repeat
    Case("llava-malformed-json", "prepare", as_recipe("llava", write(LLAVA, '[{"id": "0", "conversations": [}]')),
         (LLAVA, "line 1", "not valid JSON"), subprocess=True),
    Case("llava-utf8-bom", "prepare", as_recipe("llava", lambda p: (p / LLAVA).write_bytes(b"\xef\xbb\xbf" + (p / LLAVA).read_bytes())),
         (LLAVA, "line 1 column 1", "BOM")),
    Case("llava-not-a-list", "prepare", as_recipe("llava", write(LLAVA, '{"id": 1}')), (LLAVA, "expected a list of records, got dict")),
    Case("llava-empty", "prepare", as_recipe("llava", llava(lambda rs: rs.clear())), (LLAVA, "the dataset is empty")),
    Case("llava-missing-image", "prepare", as_recipe("llava", llava(lambda rs: rs[2].update(image="images/missing.png"))),
         (LLAVA, "[2] image", "images/missing.png", "not found")),
    Case("llava-deleted-image", "prepare", as_recipe("llava", remove(IMAGE)), (LLAVA, "[0] image", "red_circle_on_white.png", "not found")),
    Case("llava-corrupt-image", "prepare", as_recipe("llava", write(IMAGE, b"\x89PNG\r\n\x1a\nbroken")),
         (LLAVA, "red_circle_on_white.png", "does not decode")),
    Case("llava-text-as-image", "prepare", as_recipe("llava", write(IMAGE, "not an image\n")),
         (LLAVA, "red_circle_on_white.png", "does not decode")),
    Case("llava-image-folder-wrong", "prepare", as_recipe("llava", param("image_folder: data/raw/llava", "image_folder: data/raw/llava/images")),
         (LLAVA, "bad records", "not found in the image folder")),
    Case("llava-no-image-token", "prepare", as_recipe("llava", llava(lambda rs: turn(0, value="no image token")(rs[1]))),
         (LLAVA, "[1] conversations", "0 <image> tokens")),
    Case("llava-two-image-tokens", "prepare", as_recipe("llava", llava(lambda rs: turn(0, value="<image>\n<image>\ntwice")(rs[0]))),
         (LLAVA, "[0] conversations", "2 <image> tokens")),
    Case("llava-token-without-image", "prepare", as_recipe("llava", llava(lambda rs: rs[0].pop("image"))),
         (LLAVA, "[0] conversations", "<image> in a sample without an image")),
    Case("llava-wrong-turn-order", "prepare", as_recipe("llava", llava(lambda rs: turn(1, **{"from": "human"})(rs[3]))),
         (LLAVA, "[3] conversations[1].from", "turns alternate")),
    Case("llava-unknown-speaker", "prepare", as_recipe("llava", llava(lambda rs: turn(1, **{"from": "assistant"})(rs[3]))),
         (LLAVA, "[3] conversations[1].from", "'assistant' is not one of human, gpt")),
    Case("llava-empty-value", "prepare", as_recipe("llava", llava(lambda rs: turn(1, value="  ")(rs[4]))),
         (LLAVA, "[4] conversations[1].value: empty")),
    Case("llava-missing-conversations", "prepare", as_recipe("llava", llava(lambda rs: rs[5].pop("conversations"))),
         (LLAVA, "[5] conversations: missing")),

    # the internvl recipe: its params, its CLoT-style records (met by repeat), its model directory
    Case("params-internvl-downsample", "stand_in", param("downsample_ratio: 0.5", "downsample_ratio: 0.3"),
         ("stand_in.tiny.internvl.downsample_ratio: 0.3 must be 1/k with k dividing the 8 x 8 patch grid",)),
    Case("params-internvl-empty-prompt", "render", param("eval_prompt: 请你根据这张图片，讲一个脑洞大开的梗", "eval_prompt: ''"),
         ("internvl.eval_prompt: must not be empty",)),
    Case("params-internvl-lora-section", "render", param("\ninternvl:  ", "\ninternvl:\n  lora:\n    r: 128\n "),
         ("internvl.lora: unknown key",)),
    Case("internvl-missing-image", "prepare", as_recipe("internvl", llava(lambda rs: rs[2].update(image="images/cat.jpg"), INTERNVL)),
         (INTERNVL, "[2] image", "images/cat.jpg", "not found")),
    Case("internvl-two-images", "prepare",
         as_recipe("internvl", llava(lambda rs: turn(0, value="<image>\n<image>\n讲个梗")(rs[1]), INTERNVL)),
         (INTERNVL, "[1] conversations", "2 <image> tokens")),
    Case("internvl-model-missing", "validate", as_recipe("internvl"),
         ("model: models/internvl/model is not a directory", "python -m stages.link model"), pre=("prepare",)),
    Case("internvl-model-not-internvl", "validate", as_recipe("internvl", copy_tree(MODEL, "models/internvl/model")),
         ("models/internvl/model/config.json: lacks InternVL's 'force_image_size'",), pre=("prepare",)),

    # the model folder (models/<recipe>/): met by validate (its tokenizer counts the tokens)
    Case("model-not-a-directory", "validate", remove_tree(MODEL),
         ("model: models/assistant/llm is not a directory", "stand_in.tiny", "python -m stages.link llm"),
         subprocess=True),
    Case("model-without-tokenizer", "validate", remove(f"{MODEL}/tokenizer.model"),
         ("model: models/assistant/llm has no tokenizer",)),
    Case("model-without-weights", "validate", remove(f"{MODEL}/model.safetensors"),
         ("model: models/assistant/llm has no weights",)),
    Case("model-without-config", "validate", remove(f"{MODEL}/config.json"),
         ("model: models/assistant/llm has no config.json",)),
    Case("model-truncated-tokenizer", "validate", write(f"{MODEL}/tokenizer.model", "\n\x0e\n\x05<unk>"),
         ("model: the tokenizer in models/assistant/llm does not load",)),
    Case("model-tokenizer-without-code", "validate", remove(f"{MODEL}/tokenization_internlm2.py"),
         ("model: models/assistant/llm lacks tokenization_internlm2.py, the remote code its "
          "tokenizer_config.json names",)),
    Case("model-truncated-tokenizer-config", "validate", write(f"{MODEL}/tokenizer_config.json", '{"auto_map": {'),
         ("model: models/assistant/llm/tokenizer_config.json: not valid JSON",)),
    Case("model-truncated-config", "validate", write(f"{MODEL}/config.json", '{"architectures": ['),
         ("model: models/assistant/llm/config.json: not valid JSON",)),
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


# What only training and the stages after it read: DVC's cache, the trainer's work folder, the checkpoints,
# the merged model. Every mistake in CASES meets a stage before those (prepare, validate, render, the
# stand-ins, the train stage's checks, doctor), so each case's copy of the built project leaves them out:
# 19 of its 188 MB. Copied whole, the cases took 110 s of the suite's time on a 2-core machine setting up.
LATER = (".dvc/cache", "models/work", "models/checkpoints", "models/merged")


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the built project without LATER, made the working directory."""
    dest = copy_project(built, tmp_path / "project", leave_out=LATER)
    monkeypatch.chdir(dest)
    return dest


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


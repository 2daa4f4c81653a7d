"""A base model is a local directory: check it is complete, load its tokenizer. Never a hub id."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.errors import fail, settle

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.safetensors.index.json")


def how_to_get(folder: Path) -> str:
    """What makes a recipe's model folder (models/<recipe>/<role>)."""
    from stages.paths import MODEL_ROLES

    for recipe, roles in MODEL_ROLES.items():
        for role, place in roles.items():
            if Path(folder) == place:
                return (f"`dvc repro` builds its stand-in (stand_in.tiny), or link your model there: "
                        f"python -m stages.link {role} /path/to/model (recipe {recipe})")
    return "download the model there first (README.md, 'A real model on a GPU host')"


def check(path: str | Path, key: str | None = None) -> Path:
    """Fail with one line unless `path` holds a config, a tokenizer and weights; `key` names what it is
    (the folder itself by default)."""
    folder = Path(path)
    key = key or "model"
    how = how_to_get(folder)
    if not folder.is_dir():
        fail(f"{key}: {folder} is not a directory; {how}")
    if not (folder / "config.json").is_file():
        fail(f"{key}: {folder} has no config.json; {how}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        fail(f"{key}: {folder} has no tokenizer (one of {', '.join(TOKENIZER_FILES)}); {how}")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        fail(f"{key}: {folder} has no weights (*.safetensors or pytorch_model*.bin); {how}")
    from stages.structures import missing_code

    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):  # a truncated download
        if (folder / name).is_file():
            try:
                doc = json.loads((folder / name).read_bytes())
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                fail(f"{key}: {folder / name}: not valid JSON ({str(err).splitlines()[0]}); {how}")
            missing = missing_code(folder, doc) if name != "tokenizer.json" and isinstance(doc, dict) else []
            if missing:  # remote code that its auto_map names, not beside it
                fail(f"{key}: {folder} lacks {', '.join(missing)}, the remote code its {name} names (auto_map); {how}")
    return folder


def read_config(path: str | Path, key: str = "model") -> dict:
    """The model directory's config.json, or one line naming what is wrong with it."""
    file = Path(path) / "config.json"
    try:
        cfg = json.loads(file.read_bytes())
    except FileNotFoundError:
        fail(f"{key}: {file} is missing; {key} must be a model directory with its config.json")
    except ValueError as err:
        fail(f"{key}: {file}: not valid JSON ({str(err).splitlines()[0]})")
    if not isinstance(cfg, dict):
        fail(f"{key}: {file}: not a JSON object")
    return cfg


def _reason(err: BaseException) -> str:
    """The first line that says something. A fast tokenizer that fails to load makes transformers try
    a slow one, whose ImportError (protobuf, sentencepiece) hides the reason: report the first error."""
    if isinstance(err, ImportError) and err.__context__ is not None:
        err = err.__context__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def load_tokenizer(path: str | Path, key: str | None = None) -> Any:
    """AutoTokenizer from a checked local directory (remote code only from that directory)."""
    folder = check(path, key)
    from stages.xtuner_api import patch_stack

    patch_stack()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True)
    except Exception as err:  # the tokenizers library raises a bare Exception
        fail(f"{key or 'model'}: the tokenizer in {folder} does not load ({_reason(err)})")
    if not callable(tokenizer):  # transformers 4.48 returns False where SentencePiece refuses the file (with protobuf)
        fail(f"{key or 'model'}: the tokenizer in {folder} does not load (SentencePiece cannot read its tokenizer.model)")
    return tokenizer


TINY_HIDDEN = 128  # up to this width "tiny" for the CPU's threads: one thread


def cpu_threads(device: str, hidden: int | None) -> int | None:
    """1 for a model of width at most TINY_HIDDEN trained or run on the CPU, else None (torch's default,
    a thread a core). A 64-wide model's products are too small to share between threads: on 2 cores its
    training took the same or less time on one thread, and on a machine shared with other work OpenMP's
    spinning second thread made each step 6-10x slower (37-69 ms against 405-507 ms). The 192-wide default
    stand-in's are not: on an idle 2-core AMD EPYC its training loop took 69 s on two threads against 90 s
    on one, with the same bytes (the test suite runs its two processes on one thread each)."""
    return 1 if device == "cpu" and hidden and hidden <= TINY_HIDDEN else None


def use_threads(threads: int | None) -> None:
    """torch.set_num_threads(threads) when given and the user set no OMP_NUM_THREADS (theirs wins)."""
    import os

    if threads and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(threads)


def load_model(path: str | Path, key: str | None = None, **kwargs: Any) -> Any:
    """AutoModelForCausalLM from a checked local directory; damaged weights are one line."""
    folder = check(path, key)
    from stages.xtuner_api import patch_stack

    patch_stack()
    from transformers import AutoModelForCausalLM

    settle()  # before the model: a model dropped later is collected as Python would (stages/errors.py)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, local_files_only=True,
                                                     **kwargs)
    except Exception as err:  # safetensors, torch and transformers each raise their own kinds
        fail(f"{key or 'model'}: the model in {folder} does not load ({_reason(err)})")
    import torch

    if not torch.cuda.is_available():  # a tiny model on the CPU: one thread (cpu_threads)
        config = getattr(model.config, "llm_config", None) or model.config
        use_threads(cpu_threads("cpu", getattr(config, "hidden_size", None)))
    return model


def copy_remote_code(model_dir: Path, out: Path) -> list[str]:
    """The model's remote-code files (`*.py`: modeling_internlm2.py, ...) that `out` lacks, copied from
    `model_dir`, as a model saved from it needs them to load with trust_remote_code; their names."""
    import shutil

    copied = []
    for code in sorted(Path(model_dir).glob("*.py")):
        if not (out / code.name).exists():
            shutil.copy2(code, out / code.name)
            copied.append(code.name)
    return copied

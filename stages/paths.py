"""Every path the pipeline reads or writes, in one place (relative to the project root).

`data/raw/` holds the inputs the project ships; no stage ever writes there. Everything else below is
a DVC output of exactly one stage.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARAMS = Path("params.yaml")

RAW = Path("data/raw")
RAW_LLAVA = RAW / "llava"
RAW_INTERNVL = RAW / "internvl"

GENERATED = Path("data/generated")
SELF_COGNITION = GENERATED / "self_cognition.jsonl"  # stage generate
LLAVA_REPEATED = GENERATED / "llava" / "repeated_data.json"  # stage repeat
INTERNVL_REPEATED = GENERATED / "internvl" / "repeated_data.json"  # stage repeat

VALIDATED = Path("data/validated")  # stage validate: the only data training reads
VALIDATED_ASSISTANT = VALIDATED / "assistant.jsonl"
VALIDATED_LLAVA = VALIDATED / "llava.json"
VALIDATED_INTERNVL = VALIDATED / "internvl.json"

TINY_MODEL = Path("models/tiny-internlm2")  # stage base
TINY_CLIP = Path("models/tiny-clip")  # stage vision: the llava recipe's tiny CLIP vision encoder
TINY_INTERNVL = Path("models/tiny-internvl")  # stage internvl: the internvl recipe's stand-in model
PRETRAIN = Path("models/pretrain")  # stage pretrain (llava): tokenized text, projector.pth; else a note
PRETRAIN_WORK = Path("models/work-pretrain")  # stage pretrain: XTuner's work dir (not cached)
CONFIG_DIR = Path("models/config")  # stage render: xtuner_config.py [+ deepspeed.json]
CONFIG = CONFIG_DIR / "xtuner_config.py"
TRAIN_WORK = Path("models/work")  # stage train: XTuner's work dir (checkpoints for resume; not cached)
ADAPTER_PTH = Path("models/adapter.pth")  # stage train: final adapter weights, no optimizer state
ADAPTER = Path("models/adapter")  # stage convert: HF/peft adapter (safetensors); llava: llm_adapter/,
#                                   visual_encoder_adapter/, projector/; internvl: adapter.safetensors (LoRA, mlp1)
MERGED = Path("models/merged")  # stage merge: base + adapter, safetensors; llava: llm/, visual_encoder/, projector/;
#                                 internvl: convert_to_official's model with its remote code

TEMPLATES = ROOT / "stages" / "templates"
INTERNVL_CODE = ROOT / "stages" / "remote_code" / "internvl"  # the stand-in's remote code (copied into it)
# the tiny models' tokenizer code (XTuner ships InternLM2's model code, not its tokenizer's)
INTERNLM2_TOKENIZER_CODE = ROOT / "stages" / "remote_code" / "internlm2" / "tokenization_internlm2.py"

REPORTS = Path("reports")
DATA_STATS = REPORTS / "data_stats.json"  # stage validate (a DVC metric)
TRAIN_LIVE = REPORTS / "train"  # stage train: DVCLive folder (metrics.json, plots/metrics/*.tsv)
MERGE_METRICS = REPORTS / "merge.json"  # stage merge: the logits check
EVAL = REPORTS / "eval"  # stage evaluate
GENERATIONS = EVAL / "generations.jsonl"  # prompt, kind, base answer, tuned answer
EVAL_METRICS = EVAL / "metrics.json"
REPORT = REPORTS / "report.md"  # stage report
LOSS_PNG = REPORTS / "loss.png"
STAGE_TIMES = REPORTS / "stages"  # every stage: <name>.json with wall time and peak memory

CACHE = Path(".cache")  # Hugging Face and dataset caches stay inside the project

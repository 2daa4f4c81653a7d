"""Every path the pipeline reads or writes, in one place (relative to the project root).

`data/raw/` holds the inputs the project ships; no stage ever writes there. Everything else below is
a DVC output of exactly one stage.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARAMS = Path("params.yaml")

RAW = Path("data/raw")
RAW_GENERAL_CHAT = RAW / "general_chat.jsonl"
RAW_SELF_COGNITION = RAW / "self_cognition.json"
RAW_LLAVA = RAW / "llava"

GENERATED = Path("data/generated")
SELF_COGNITION = GENERATED / "self_cognition.jsonl"  # stage generate
LLAVA_REPEATED = GENERATED / "llava" / "repeated_data.json"  # stage repeat

VALIDATED = Path("data/validated")  # stage validate: the only data training reads
VALIDATED_ASSISTANT = VALIDATED / "assistant.jsonl"
VALIDATED_LLAVA = VALIDATED / "llava.json"

TINY_MODEL = Path("models/tiny-internlm2")  # stage base

REPORTS = Path("reports")
DATA_STATS = REPORTS / "data_stats.json"  # stage validate (a DVC metric)

CACHE = Path(".cache")  # Hugging Face and dataset caches stay inside the project

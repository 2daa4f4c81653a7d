"""Every path the pipeline reads or writes, in one place (relative to the project root).

`data/raw/` holds the inputs the project ships; no stage ever writes there. Everything else below is
a DVC output of exactly one stage.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PARAMS = Path("params.yaml")

RAW = Path("data/raw")
RAW_ASSISTANT = RAW / "assistant"  # the assistant recipe's files (the LLM stand-in learns from them too)
RAW_LLAVA = RAW / "llava"
RAW_INTERNVL = RAW / "internvl"

GENERATED = Path("data/generated")  # stage prepare: data/generated/<recipe>/
SELF_COGNITION = GENERATED / "assistant" / "self_cognition.jsonl"
LLAVA_REPEATED = GENERATED / "llava" / "repeated_data.json"
INTERNVL_REPEATED = GENERATED / "internvl" / "repeated_data.json"

VALIDATED = Path("data/validated")  # stage validate: data/validated/<recipe>/, the only data training reads
VALIDATED_ASSISTANT = VALIDATED / "assistant" / "train.jsonl"
VALIDATED_LLAVA = VALIDATED / "llava" / "train.json"
VALIDATED_INTERNVL = VALIDATED / "internvl" / "train.json"

# Each recipe reads its models from its own folder, models/<recipe>/, the one model dep of its stages
# (dvc.yaml: models/${recipe}): built there by the stage stand_in@tiny, or your models linked in
# (`python -m stages.link`). An edit to another recipe's models changes nothing here.
MODELS = Path("models")
MODEL_ROLES = {  # recipe -> role -> folder
    "assistant": {"llm": MODELS / "assistant" / "llm"},  # internlm2-chat-1_8b
    "llava": {"llm": MODELS / "llava" / "llm",  # internlm2-chat-1_8b
              "vision": MODELS / "llava" / "vision"},  # CLIP ViT-L/14-336
    "internvl": {"model": MODELS / "internvl" / "model"},  # InternVL2-2B, its remote code included
}
STAND_IN_MARK = ".stand_in"  # in each stand-in folder: `python -m stages.link` may replace it
LLAVA_VISION = MODEL_ROLES["llava"]["vision"]
INTERNVL_MODEL = MODEL_ROLES["internvl"]["model"]


def model_folder(recipe: str) -> Path:
    """models/<recipe>/: every model the recipe reads."""
    return MODELS / recipe


def llm_dir(recipe: str) -> Path:
    """The recipe's language model: models/<recipe>/llm (internvl: its model holds its LLM)."""
    return MODEL_ROLES[recipe].get("llm", INTERNVL_MODEL)


PRETRAIN = Path("models/pretrain")  # stage train (llava): tokenized text and the projector it starts from
PRETRAIN_WORK = Path("models/work-pretrain")  # stage train (llava): XTuner's work dir of the projector phase
CONFIG_DIR = Path("models/config")  # stage render: xtuner_config.py [+ deepspeed.json]
CONFIG = CONFIG_DIR / "xtuner_config.py"
TRAIN_WORK = Path("models/work")  # stage train: XTuner's work dir (checkpoints for resume; not cached)
TENSORBOARD_RUNS = Path("models/tensorboard")  # stage train: every run's TensorBoard events (not cached)
SNAPSHOTS = TRAIN_WORK / "snapshots"  # stage train: each checkpoint's adapter weights as it is saved (stages/snapshots.py)
SCORED = TRAIN_WORK / "scores"  # stage train: checkpoints scored beside the trainer (select.during_training), read by select
TRAINED = SCORED / "trained"  # stage train: written when the trainer is done, so that the scorer beside it finishes
CHECKPOINTS = Path("models/checkpoints")  # stage train: iter_N.pth, each checkpoint's adapter weights, no optimizer state
ADAPTER_PTH = Path("models/adapter.pth")  # stage select: the chosen checkpoint's adapter weights
ADAPTER = Path("models/adapter")  # stage convert: HF/peft adapter (safetensors); llava: llm_adapter/,
#                                   visual_encoder_adapter/, projector/; internvl: adapter.safetensors (LoRA, mlp1)
MERGED = Path("models/merged")  # stage merge: base + adapter, safetensors; llava: llm/, visual_encoder/, projector/;
#                                 internvl: convert_to_official's model with its remote code

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
CURVES_PNG = REPORTS / "curves.png"  # the report's picture of select's scores (recipe assistant)
STAGE_TIMES = REPORTS / "stages"  # every stage: <name>.json with wall time and peak memory

SELECT = REPORTS / "select"  # stage select: scores.json (a plot over the step), choice.json, answers.jsonl
CACHE = Path(".cache")  # Hugging Face and dataset caches stay inside the project

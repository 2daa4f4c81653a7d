"""What the llava recipe's stages share: XTuner's LLaVA pieces run in this process, the check of a
`pretrained_pth`, and answering an image prompt.

- `tokenize`: LLaVA json -> XTuner's tokenized text, as LLaVADataset does it, but with one process
  (LLaVADataset maps with 32 processes, hard-coded: 17 s instead of 0.1 s for 160 records on 2 cores).
  The rendered config reads it through `offline_processed_text_folder`.
- `check_pretrained_pth`: XTuner's LLaVAModel loads `pretrained_pth` with strict=False, so a file
  whose keys do not fit (the text recipe's adapter.pth: same LoRA key names) loads silently and the
  projector stays random; a key of the right name and another shape fails deep in model building.
  This says either in one line before anything is built.
- `merge_llava`: `xtuner convert merge` for the LLM and for the CLIP (`--is-clip`), in this process.
- `Chat`: greedy answers to an image prompt as `xtuner chat --llava` does, from merged parts or from
  the base models plus adapters (the merge check compares the two).

Every XTuner import happens after `xtuner_api.patch_stack()`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stages.errors import fail

PROJECTOR_DEPTH = 2  # XTuner's ProjectorModel default: Linear, GELU, Linear
IMAGE_TOKEN = "<image>"


# ---------------------------------------------------------------------------------------------
# data


def tokenize(data: Path, llm: Path, prompt_template: str, max_length: int, out: Path) -> int:
    """Tokenize LLaVA records exactly as LLaVADataset.__init__ does (llava_map_fn, the chat template,
    `<image>` -> IMAGE_TOKEN_INDEX) into `out` (Arrow, save_to_disk). Returns the number of samples."""
    from stages.xtuner_api import patch_stack

    patch_stack()
    from datasets import Dataset, DatasetDict
    from xtuner.dataset.huggingface import process_hf_dataset
    from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE

    from stages.io import output_dir, read_json
    from stages.modeldir import load_tokenizer

    records = read_json(data, "run `dvc repro validate` first")
    for r in records:  # as LLaVADataset: int ids become strings (Arrow needs one type)
        if isinstance(r.get("id"), int):
            r["id"] = str(r["id"])
    tokenizer = load_tokenizer(llm)
    tokenizer.padding_side = "right"
    text = process_hf_dataset(
        dataset=DatasetDict({"train": Dataset.from_list(records)}), tokenizer=tokenizer,
        max_length=max_length, dataset_map_fn=llava_map_fn,
        template_map_fn=template_map_fn_factory(template=PROMPT_TEMPLATE[prompt_template]),
        split="train", remove_unused_columns=False, pack_to_max_length=False, with_image_token=True,
        map_num_proc=1)
    with output_dir(Path(out)) as tmp:
        text.save_to_disk(str(tmp))
    return len(text)


def mean_sample_tokens(text_folder: Path, image_tokens: int) -> float:
    """Mean tokens a tokenized sample (tokenize's output) feeds the LLM: its text, each image
    placeholder counted as the image's tokens."""
    from datasets import load_from_disk
    from xtuner.utils import IMAGE_TOKEN_INDEX

    ids = load_from_disk(str(text_folder))["input_ids"]
    sizes = [len(x) + (image_tokens - 1) * x.count(IMAGE_TOKEN_INDEX) for x in ids]
    return round(sum(sizes) / len(sizes), 1) if sizes else 0.0


# ---------------------------------------------------------------------------------------------
# pretrained_pth


def expected_projector(visual_hidden: int, llm_hidden: int, depth: int = PROJECTOR_DEPTH) -> dict:
    """Keys and shapes of XTuner's ProjectorModel inside LLaVAModel (Linear, GELU, Linear, ...)."""
    out = {"projector.model.0.weight": (llm_hidden, visual_hidden), "projector.model.0.bias": (llm_hidden,)}
    for i in range(1, depth):
        out[f"projector.model.{2 * i}.weight"] = (llm_hidden, llm_hidden)
        out[f"projector.model.{2 * i}.bias"] = (llm_hidden,)
    return out


def expected_projector_from_dirs(llm: Path, visual_encoder: Path) -> dict:
    """`expected_projector` from the two models' config.json (no weights loaded)."""
    from stages.io import read_json

    llm_cfg = read_json(Path(llm) / "config.json", f"the LLM {llm}")
    vis_cfg = read_json(Path(visual_encoder) / "config.json", f"the vision encoder {visual_encoder}")
    vis_cfg = vis_cfg.get("vision_config", vis_cfg)  # a full CLIPModel config holds the vision part
    return expected_projector(vis_cfg["hidden_size"], llm_cfg["hidden_size"])


def _few(keys: list[str], n: int = 2) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def pth_problems(weights: Mapping[str, Any], expected: Mapping[str, tuple]) -> dict[str, list[str]]:
    """missing (projector keys the file lacks), unexpected (file keys the model has no place for) and
    mismatched (same key, other shape: 'key: file shape vs model shape'); pure."""
    got = {k: tuple(v.shape) for k, v in weights.items() if hasattr(v, "shape")}
    return {
        "missing": sorted(k for k in expected if k not in got),
        "unexpected": sorted(k for k in got if k not in expected),
        "mismatched": sorted(f"{k}: {list(got[k])} vs {list(expected[k])}" for k in got
                             if k in expected and got[k] != tuple(expected[k])),
        "loaded": sorted(k for k in got if k in expected and got[k] == tuple(expected[k])),
    }


def check_pretrained_pth(path: Path, llm: Path, visual_encoder: Path, key: str = "llava.pretrained_pth") -> dict:
    """The projector weights of `path` (a .pth file or DeepSpeed checkpoint folder), after checking
    they fit the LLM and vision encoder; one line naming what does not fit otherwise."""
    from stages.xtuner_api import load_checkpoint_weights

    path = Path(path)
    if not path.exists():
        fail(f"{key}: {path}: not found")
    weights = load_checkpoint_weights(path, key)
    expected = expected_projector_from_dirs(llm, visual_encoder)
    p = pth_problems(weights, expected)
    parts = []
    if p["mismatched"]:
        parts.append(f"{len(p['mismatched'])} with another shape ({_few(p['mismatched'], 1)})")
    if p["missing"]:
        parts.append(f"{len(p['missing'])} missing ({_few(p['missing'])})")
    if p["unexpected"]:
        parts.append(f"{len(p['unexpected'])} unexpected ({_few(p['unexpected'])})")
    if parts:
        fail(f"{key}: {path} does not fit {llm} + {visual_encoder} ({len(p['loaded'])} of {len(expected)} "
             f"projector keys would load; XTuner would ignore the rest silently): " + "; ".join(parts))
    return {k: weights[k] for k in sorted(expected)}


# ---------------------------------------------------------------------------------------------
# convert and merge


def merge_tool(base: Path, adapter: Path, out: Path, is_clip: bool) -> None:
    """`xtuner convert merge BASE ADAPTER OUT [--is-clip] --safe-serialization --device cuda|cpu`, in
    this process. XTuner loads, merges and saves the LLM in float16 (hard-coded); the CLIP in its own dtype."""
    from stages.xtuner_api import patch_stack, run_tool

    patch_stack()
    from xtuner.tools.model_converters import merge as tool

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    argv = [str(base), str(adapter), str(out), "--safe-serialization", "--device", device]
    run_tool(tool, "xtuner-merge", argv + (["--is-clip"] if is_clip else []))


def merge_llava(hf: Path, llm: Path, visual_encoder: Path, out: Path) -> None:
    """The fine-tuned LLaVA as three plain models, as the tutorial's two `xtuner convert merge` calls:
    out/llm (LLM + llm_adapter, with the tokenizer), out/visual_encoder (CLIP + visual_encoder_adapter,
    with the image processor), out/projector (copied). A part without an adapter is copied."""
    from stages.io import output_dir
    from stages.modeldir import copy_remote_code

    with output_dir(out) as tmp:
        for part, base, clip in (("llm", llm, False), ("visual_encoder", visual_encoder, True)):
            adapter = hf / f"{part}_adapter"
            if adapter.is_dir():
                merge_tool(base, adapter, tmp / part, is_clip=clip)
            else:
                shutil.copytree(base, tmp / part)
        copy_remote_code(llm, tmp / "llm")
        shutil.copytree(hf / "projector", tmp / "projector")


# ---------------------------------------------------------------------------------------------
# chat


@dataclass
class Chat:
    """One LLaVA model in XTuner's layout, all parts in one dtype, eval mode, on the GPU where there is one."""

    llm: Any
    tokenizer: Any
    visual_encoder: Any
    image_processor: Any
    projector: Any
    template: str = "internlm2_chat"
    visual_select_layer: int = -2
    device: str = "cpu"

    @classmethod
    def load(cls, llm: Path, visual_encoder: Path, projector: Path | Mapping[str, Any],
             llm_adapter: Path | None = None, visual_encoder_adapter: Path | None = None,
             template: str = "internlm2_chat") -> "Chat":
        """`projector`: a pth_to_hf projector/ folder, or projector weights as a state dict (keys
        `projector.model.*`, as in a pretrain checkpoint). float32 throughout: a float16 LLM with a
        float32 encoder fails on CPU, and the merge check compares in float32."""
        from stages.modeldir import load_model, load_tokenizer
        from stages.xtuner_api import patch_stack

        patch_stack()
        import torch
        from peft import PeftModel
        from transformers import CLIPImageProcessor, CLIPVisionModel
        from xtuner.model.modules import ProjectorConfig, ProjectorModel

        model = load_model(llm, None, torch_dtype=torch.float32)
        tokenizer = load_tokenizer(llm)
        if llm_adapter is not None:
            model = PeftModel.from_pretrained(model, str(llm_adapter), is_trainable=False)
        try:
            vit = CLIPVisionModel.from_pretrained(str(visual_encoder), torch_dtype=torch.float32,
                                                  local_files_only=True)
            processor = CLIPImageProcessor.from_pretrained(str(visual_encoder), local_files_only=True)
        except (OSError, ValueError) as err:
            fail(f"{visual_encoder}: does not load as a CLIP vision model "
                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})")
        if visual_encoder_adapter is not None:
            vit = PeftModel.from_pretrained(vit, str(visual_encoder_adapter), is_trainable=False)
        if isinstance(projector, Mapping):
            w = projector["projector.model.0.weight"]
            proj = ProjectorModel(ProjectorConfig(visual_hidden_size=w.shape[1], llm_hidden_size=w.shape[0],
                                                  depth=PROJECTOR_DEPTH))
            proj.load_state_dict({k[len("projector."):]: v for k, v in projector.items()})
        else:
            proj = ProjectorModel.from_pretrained(str(projector), torch_dtype=torch.float32)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(model.to(device).eval(), tokenizer, vit.to(device).eval(), processor,
                   proj.float().to(device).eval(), template, device=device)

    def inputs(self, image: Path, prompt: str, system: str = "") -> dict:
        """The LLM's inputs_embeds: the prompt in the chat template, the image's embeddings spliced in
        (the image padded to a square with the mean colour, as XTuner's finetune data and chat do)."""
        import torch
        from xtuner.dataset.utils import expand2square, load_image
        from xtuner.model.utils import prepare_inputs_labels_for_multimodal
        from xtuner.utils import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, PROMPT_TEMPLATE

        t = PROMPT_TEMPLATE[self.template]
        text = (t["SYSTEM"].format(system=system) if system and "SYSTEM" in t else "") + \
            t["INSTRUCTION"].format(input=DEFAULT_IMAGE_TOKEN + "\n" + prompt, round=1, bot_name="")
        before, after = text.split(DEFAULT_IMAGE_TOKEN)
        ids = self.tokenizer.encode(before) + [IMAGE_TOKEN_INDEX] + \
            self.tokenizer.encode(after, add_special_tokens=False)
        img = expand2square(load_image(str(image)), tuple(int(x * 255) for x in self.image_processor.image_mean))
        pixels = self.image_processor.preprocess(img, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.no_grad():
            hidden = self.visual_encoder(pixels, output_hidden_states=True).hidden_states[self.visual_select_layer]
            embeds = self.projector(hidden[:, 1:])
            input_ids = torch.tensor([ids], device=self.device)
            out = prepare_inputs_labels_for_multimodal(llm=self.llm, input_ids=input_ids, pixel_values=embeds,
                                                       attention_mask=torch.ones_like(input_ids))
        return {k: v for k, v in out.items() if k != "labels"}

    def answer(self, image: Path, prompt: str, max_new_tokens: int, system: str = "") -> tuple[str, int]:
        """Greedy answer (stops at the template's stop words or EOS), and its token count."""
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList
        from xtuner.utils import PROMPT_TEMPLATE, StopWordStoppingCriteria

        stop_words = PROMPT_TEMPLATE[self.template].get("STOP_WORDS", [])
        stops = StoppingCriteriaList([StopWordStoppingCriteria(self.tokenizer, w) for w in stop_words])
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=self.tokenizer.eos_token_id,
                               pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        with torch.no_grad():
            out = self.llm.generate(**self.inputs(image, prompt, system), generation_config=gen,
                                    bos_token_id=self.tokenizer.bos_token_id, stopping_criteria=stops)
        text = self.tokenizer.decode(out[0], skip_special_tokens=False)  # inputs_embeds: new tokens only
        for w in stop_words + [self.tokenizer.eos_token or "</s>", "<|im_start|>"]:  # or a new turn begins
            text = text.split(w)[0]
        for special in self.tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text.strip(), int(out.shape[1])

    def logits(self, image: Path, prompt: str) -> Any:
        import torch

        with torch.no_grad():
            return self.llm(**self.inputs(image, prompt)).logits.float().cpu()


def first_questions(records: list[dict]) -> dict[str, tuple[str, str]]:
    """image -> (its first question without `<image>`, the first answer) in LLaVA records."""
    out: dict[str, tuple[str, str]] = {}
    for r in records:
        if "image" in r and r["image"] not in out:
            turns = r["conversations"]
            out[r["image"]] = (turns[0]["value"].replace(IMAGE_TOKEN, "").strip(), turns[1]["value"].strip())
    return out


def note(path: Path, recipe: str, what: str) -> None:
    """The small JSON a stage writes when it has nothing to do for the recipe (DVC needs its outputs)."""
    from stages.io import write_json

    write_json(path, {"recipe": recipe, "note": what})


def read_note(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None

"""Talk to the result: the base model, the adapter on the base, or the merged model, in the terminal or a
web page, through the chat template the recipe trained with.

The tutorials end with `xtuner chat` (the base model, `--adapter`, the merged model,
`--prompt-template internlm2_chat`, `--image` for LLaVA) and LMDeploy's pipeline for InternVL2; this is
the same conversation on the current workspace. Greedy decoding as the evaluate stage's, so an answer
here is the answer the report shows. Not a pipeline stage: it reads models/ and writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from stages import params as P
from stages.errors import fail, verbose

EXAMPLES = """\
examples (after `dvc repro`):
  python -m stages.chat                                  # talk to models/merged in the terminal
  python -m stages.chat --prompt "你是谁"                 # one answer on stdout, then exit (scriptable)
  python -m stages.chat --base                           # the base model, before fine-tuning
  python -m stages.chat --adapter models/adapter         # the adapter on the base model (not merged)
  python -m stages.chat --model /path/to/internlm2-chat-1_8b --system "You are helpful."
  python -m stages.chat --image data/raw/llava/images/red_circle_on_white.png   # recipe llava or internvl: ask about an image
  python -m stages.chat --web --port 7860                # a chat page on http://127.0.0.1:7860 (pip install gradio)
  LMDEPLOY_PYTHON=/opt/lmdeploy/bin/python python -m stages.chat --backend lmdeploy   # a GPU host

in the terminal: /reset clears the history, /exit (or Ctrl-D, Ctrl-C) leaves.

The tutorials' commands, here:
  xtuner chat <base> --prompt-template internlm2_chat                 python -m stages.chat --base
  xtuner chat <base> --adapter <hf adapter> --prompt-template ...     python -m stages.chat --adapter models/adapter
  xtuner chat <merged> --prompt-template internlm2_chat               python -m stages.chat
  xtuner chat <llm> --visual-encoder <clip> --llava <adapter> --image <img>
                                                                      python -m stages.chat --image <img>  (recipe llava)
  lmdeploy pipeline(<internvl2 merged>)((prompt, load_image(img)))    python -m stages.chat --image <img> --backend lmdeploy
"""

IMAGE_RECIPES = ("llava", "internvl")
STOP_WORDS = ("<|im_end|>",)


# ---------------------------------------------------------------------------------------------
# the models, as one interface: reply(history, image) -> the answer's text in pieces


class TextModel:
    """A causal LM (with an optional peft adapter) through `stages.generation.TransformersChat`: its
    tokenizer's chat template (XTuner's `template` where it has none), the whole history each turn,
    greedy, the answer streamed as it is generated."""

    images = False

    def __init__(self, path: Path, device: str, system: str, template: str, adapter: Path | None = None) -> None:
        from stages.generation import TransformersChat

        self.chat = TransformersChat(path, device, system, template)
        if adapter is not None:
            from peft import PeftModel

            check_adapter(adapter)
            try:
                self.chat.model = PeftModel.from_pretrained(self.chat.model, str(adapter), is_trainable=False).eval()
            except Exception as err:  # a mismatched adapter: peft and torch raise their own kinds
                fail(f"--adapter: {adapter} does not fit {path} ({type(err).__name__}: {first_line(err)})")

    def encode(self, history: list[dict]) -> list[int]:
        tok = self.chat.tok
        if getattr(tok, "chat_template", None):
            return self.chat.encode(history)
        from stages.xtuner_api import prompt_template

        t = prompt_template(self.chat.template)  # XTuner's template, the turns one after another
        text = t["SYSTEM"].format(system=self.chat.system) if self.chat.system and t.get("SYSTEM") else ""
        n = 0
        for m in history:
            if m["role"] == "user":
                n += 1
                text += t["INSTRUCTION"].format(input=m["content"], round=n)
            elif m["role"] == "assistant":
                text += m["content"] + t.get("SUFFIX", "") + t.get("SEP", "")
        return tok(text)["input_ids"]

    def reply(self, history: list[dict], image: Path | None, max_new_tokens: int) -> Iterator[str]:
        import threading

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tok, model = self.chat.tok, self.chat.model
        ids = torch.tensor([self.encode(history)], device=self.chat.device)
        stop = [i for i in {tok.eos_token_id, *(tok.convert_tokens_to_ids(w) for w in STOP_WORDS)}
                if isinstance(i, int) and i != tok.unk_token_id]
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        halt = threading.Event()  # set when the reader stops listening (Ctrl-C, a closed page)

        class Halted(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        def generate() -> None:
            try:
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id,
                                   streamer=streamer, stopping_criteria=StoppingCriteriaList([Halted()]))
            except BaseException as err:  # reported in the caller's thread
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        try:
            for piece in streamer:
                yield piece
        finally:
            halt.set()
            thread.join()
        if errors:
            raise errors[0]


class LlavaModel:
    """XTuner's LLaVA layout (an LLM, a CLIP encoder, a projector) through the recipe's own
    `Chat.answer`: one question about the image a turn, as `xtuner chat --image` asks it."""

    images = True

    def __init__(self, chat: Any, system: str) -> None:
        self.chat, self.system = chat, system

    def reply(self, history: list[dict], image: Path | None, max_new_tokens: int) -> Iterator[str]:
        if image is None:
            fail("recipe llava answers about an image: give --image PATH (in the web page: an image)")
        yield self.chat.answer(image, history[-1]["content"], max_new_tokens, self.system)[0]


class InternVLModel:
    """An InternVL model directory through the recipe's `Chat` (the model's own chat()): one question
    about the image a turn, as the tutorial's LMDeploy pipeline asks it."""

    images = True

    def __init__(self, path: Path) -> None:
        from stages.recipes.internvl.steps import Chat

        self.chat = Chat(path, str(path))
        if not hasattr(self.chat.model.config, "force_image_size"):
            fail(f"--model: {path} is not an InternVL model (no vision part in its config.json); recipe internvl "
                 "talks to its merged model after `dvc repro`, or --base")

    def reply(self, history: list[dict], image: Path | None, max_new_tokens: int) -> Iterator[str]:
        if image is None:
            fail("recipe internvl answers about an image: give --image PATH (in the web page: an image)")
        yield self.chat.answer(image, history[-1]["content"], max_new_tokens)[0]


# LMDeploy, in an interpreter of its own (it cannot share XTuner 0.2.0's environment): the pipeline
# started once, then one JSON request a line on stdin ({"messages": [...]}, OpenAI format, images as
# image_url parts), the answer streamed back as JSON lines {"text": piece}, then {"done": true}
LMDEPLOY_CHAT_SCRIPT = """
import json, os, sys
reply = os.fdopen(os.dup(1), "w", buffering=1)  # the answers' channel; whatever else prints goes to stderr
os.dup2(2, 1)
from lmdeploy import ChatTemplateConfig, GenerationConfig, PytorchEngineConfig, pipeline
req = json.loads(sys.stdin.readline())
# one conversation at a time: a batch of 1 and a fifth of the free memory for its cache (a tiny model's
# small blocks otherwise make the engine's block tables alone larger than the GPU)
engine = PytorchEngineConfig(max_batch_size=1, cache_max_entry_count=0.2)
pipe = pipeline(req["model"], backend_config=engine, chat_template_config=ChatTemplateConfig(**req["template"]))
gen = GenerationConfig(max_new_tokens=req["max_new_tokens"], do_sample=False)
print(json.dumps({"ready": True}), file=reply)
for line in sys.stdin:
    messages = json.loads(line)["messages"]
    for out in pipe.stream_infer([messages], gen_config=gen):
        print(json.dumps({"text": out.text}), file=reply)
    print(json.dumps({"done": True}), file=reply)
"""


class LMDeployModel:
    """LMDeploy's pipeline in $LMDEPLOY_PYTHON (as the evaluate stage runs it), kept running for the
    conversation: InternLM2's chat template for text, internvl2-internlm2 for InternVL2."""

    def __init__(self, path: Path, recipe: str, system: str, max_new_tokens: int) -> None:
        import subprocess

        from stages.generation import lmdeploy_template

        self.images = recipe == "internvl"
        if recipe == "internvl":
            from stages.recipes.internvl.steps import INTERNVL2_SYSTEM, LMDEPLOY_TEMPLATE

            template = {**lmdeploy_template(system or INTERNVL2_SYSTEM), "model_name": LMDEPLOY_TEMPLATE}
        else:
            template = lmdeploy_template(system)
        self.system = system
        python = os.environ["LMDEPLOY_PYTHON"]
        # the engine's notices, its transformers' warnings and its load bars go to a log file (all of
        # it on the terminal with PIPELINE_VERBOSE=1); a failure names the file and its last line
        self.log = None if verbose() else tempfile.NamedTemporaryFile("w+", prefix="lmdeploy-chat-", suffix=".log",
                                                                       delete=False)
        try:
            self.proc = subprocess.Popen([python, "-c", LMDEPLOY_CHAT_SCRIPT], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        except OSError as err:
            fail(f"--backend lmdeploy: LMDEPLOY_PYTHON={python} cannot run ({err.strerror})")
        self.send({"model": str(path), "template": template, "max_new_tokens": max_new_tokens})
        starting = f"the pipeline did not start on {path} in {python}"
        if "ready" not in self.receive(starting):
            fail(f"--backend lmdeploy: {starting}{self.why()}")

    def why(self) -> str:
        """` (LAST LINE OF ITS LOG; log: PATH)`, or ` (its error is above)` when it printed to the terminal."""
        if self.log is None:
            return " (its error is above)"
        self.log.flush()
        lines = [ln.strip() for ln in Path(self.log.name).read_text(errors="replace").splitlines() if ln.strip()]
        return f" ({lines[-1] if lines else 'no error printed'}; log: {self.log.name})"

    def send(self, request: dict) -> None:
        import json

        try:
            self.proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc.wait()
            fail(f"--backend lmdeploy: the LMDeploy process ended{self.why()}")

    def receive(self, doing: str = "the LMDeploy process ended") -> dict:
        import json

        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            fail(f"--backend lmdeploy: {doing}{self.why()}")
        return json.loads(line)

    def reply(self, history: list[dict], image: Path | None, max_new_tokens: int) -> Iterator[str]:
        messages = [dict(m) for m in history]
        if image is not None:
            messages[-1]["content"] = [{"type": "text", "text": messages[-1]["content"]},
                                       {"type": "image_url", "image_url": {"url": str(Path(image).resolve())}}]
        if self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        self.send({"messages": messages})
        while True:
            out = self.receive()
            if out.get("done"):
                return
            yield out["text"]

    def close(self) -> None:
        self.proc.stdin.close()
        if self.proc.wait() == 0 and self.log is not None:  # a clean end: its notices are not needed
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)


def check_image(image: Path) -> None:
    if not image.is_file():
        fail(f"--image: {image} is not a file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        fail(f"--image: {image} is not an image Pillow can read ({type(err).__name__})")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def check_adapter(folder: Path) -> None:
    if not folder.is_dir():
        fail(f"--adapter: {folder} is not a directory; `dvc repro convert` writes models/adapter")
    if not (folder / "adapter_config.json").is_file():
        fail(f"--adapter: {folder} has no adapter_config.json (a peft adapter, as `xtuner convert pth_to_hf` "
             "writes it)")


def default_model(recipe: str, base: bool) -> Path:
    from stages.paths import MERGED, llm_dir

    return llm_dir(recipe) if base else MERGED


def describe(args: argparse.Namespace) -> str:
    """The model talked to, in words."""
    from stages.paths import llm_dir

    if args.adapter:
        return f"{args.adapter} on {args.model or llm_dir(args.recipe)}"
    return str(args.model or default_model(args.recipe, args.base))


def load(args: argparse.Namespace, p: P.Params) -> Any:
    """The model the options name, loaded for the recipe (see `--help`)."""
    from stages.paths import ADAPTER, ADAPTER_PTH, LLAVA_VISION, MERGED, llm_dir

    recipe = args.recipe
    if args.image is not None and recipe not in IMAGE_RECIPES:
        fail(f"--image: recipe {recipe} is a text model; images are for the recipes {' and '.join(IMAGE_RECIPES)} "
             f"(params.yaml recipe, or --recipe)")
    if args.image is not None:
        check_image(Path(args.image))
    if args.base and (args.model or args.adapter):
        fail("--base: the base model is the recipe's own; leave out --model and --adapter")
    model = Path(args.model) if args.model else None
    adapter = Path(args.adapter) if args.adapter else None
    import torch

    from stages.generation import lmdeploy_configured, pick_backend

    backend = pick_backend(args.backend, torch.cuda.is_available(), lmdeploy_configured())
    if backend == "lmdeploy":
        if not lmdeploy_configured():
            fail("--backend lmdeploy needs its own environment: set LMDEPLOY_PYTHON to a Python that has lmdeploy "
                 "(benchmarks/lmdeploy_env.sh builds one on a GPU host), or use --backend transformers")
        if recipe == "llava":
            fail("--backend lmdeploy: LMDeploy does not read XTuner's LLaVA layout; use --backend transformers")
        if adapter is not None:
            fail("--backend lmdeploy serves whole models: give the merged model (no --adapter)")
    if adapter is not None and model is None:
        model = llm_dir(recipe)  # the adapter goes on the base model it was trained on
    model = model or default_model(recipe, args.base)
    if not model.is_dir():
        how = "`dvc repro` builds it" if model in (MERGED, llm_dir(recipe)) else "give a model directory"
        fail(f"--model: {model} is not a directory; {how}")
    if backend == "lmdeploy":
        return LMDeployModel(model, recipe, args.system, args.max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if recipe == "assistant":
        return TextModel(model, device, args.system, p.train.prompt_template, adapter)
    if recipe == "internvl":
        if adapter is not None:
            fail("--adapter: recipe internvl's adapter is not a peft adapter (convert_to_official merges it); "
                 "talk to models/merged or --base")
        return InternVLModel(model)
    from stages.recipes.llava import model as llava  # recipe llava: its parts, as the evaluate stage loads them

    template = p.train.prompt_template
    if adapter is None and not args.base:  # a merged folder: llm/, visual_encoder/, projector/
        if not all((model / part).is_dir() for part in ("llm", "visual_encoder", "projector")):
            fail(f"--model: {model} is not a merged LLaVA (llm/, visual_encoder/, projector/); recipe llava talks "
                 "to its merged model after `dvc repro`, --base, or --adapter models/adapter")
        return LlavaModel(llava.Chat.load(model / "llm", model / "visual_encoder", model / "projector",
                                          template=template), args.system)
    if adapter is not None:  # pth_to_hf's folder: llm_adapter/, visual_encoder_adapter/, projector/
        if not (adapter / "projector").is_dir():
            fail(f"--adapter: {adapter} has no projector/; recipe llava's adapter is `dvc repro convert`'s {ADAPTER}")
        vit_adapter = adapter / "visual_encoder_adapter"
        return LlavaModel(llava.Chat.load(model, LLAVA_VISION, adapter / "projector", adapter / "llm_adapter",
                                          vit_adapter if vit_adapter.is_dir() else None, template=template),
                          args.system)
    if not ADAPTER_PTH.is_file():  # the base: the LLM, the encoder and the projector it started from
        fail(f"--base: recipe llava's base needs the pretrained projector in {ADAPTER_PTH}; run `dvc repro` first")
    projector = torch.load(ADAPTER_PTH, map_location="cpu", weights_only=True)["projector_before"]
    return LlavaModel(llava.Chat.load(model, LLAVA_VISION, projector, template=template), args.system)


# ---------------------------------------------------------------------------------------------
# the terminal


def one_answer(model: Any, prompt: str, image: Path | None, max_new_tokens: int) -> str:
    """`--prompt`: the answer alone on stdout, streamed."""
    pieces = []
    for piece in model.reply([{"role": "user", "content": prompt}], image, max_new_tokens):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces).strip()


def interactive(model: Any, image: Path | None, max_new_tokens: int, read: Callable[[str], str] = input) -> None:
    """`>>> ` prompts; the answer streamed; /reset, /exit, Ctrl-D and Ctrl-C."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    history: list[dict] = []
    while True:
        try:
            line = read(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for piece in model.reply(history, image, max_new_tokens):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the conversation goes on
            print(" [stopped]", flush=True)
        print(flush=True)
        answer = "".join(pieces).strip()
        history.append({"role": "assistant", "content": answer})
        if model.images:  # the image recipes answer each question about the image afresh
            history = []


# ---------------------------------------------------------------------------------------------
# the web page


def message_text(content: Any) -> str:
    """A Gradio chat message's text (a string, or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def web(model: Any, args: argparse.Namespace, title: str) -> None:
    """A Gradio ChatInterface on `args.host`:`args.port` (127.0.0.1 unless --host says otherwise), no
    analytics (nothing leaves the machine); an image input for the image recipes."""
    import warnings

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the web stack's own, once a request
    try:
        import gradio as gr
    except ImportError:
        fail("--web needs Gradio: pip install gradio (or `pip install -e '.[web]'`; `make test` installs it)")

    def respond(message: Any, history: list, image: str | None = None):
        turns = [] if model.images else [{"role": m["role"], "content": message_text(m["content"])}
                                         for m in history if m.get("role") in ("user", "assistant")]
        turns.append({"role": "user", "content": message_text(message)})
        text = ""
        try:
            for piece in model.reply(turns, Path(image) if image else None, args.max_new_tokens):
                text += piece
                yield text
        except Exception as err:  # StageError: a missing image, ...: shown in the page, not fatal
            raise gr.Error(str(err)) from None

    extra = [gr.Image(value=args.image, type="filepath", label="image")] if model.images else None
    demo = gr.ChatInterface(respond, additional_inputs=extra, title=title, analytics_enabled=False,
                            description="Greedy answers through the chat template the recipe trained with "
                                        "(python -m stages.chat).",
                            additional_inputs_accordion=gr.Accordion("image", open=True) if extra else None)
    print(f"[chat] serving {title} on http://{args.host}:{args.port} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True,
                    footer_links=[], show_error=True)
    except OSError as err:  # the port is taken
        fail(f"--port {args.port}: cannot serve on {args.host}:{args.port} ({first_line(err)})")


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m stages.chat", description=__doc__.split("\n\n")[0].replace("\n", " "), epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", metavar="PATH",
                    help="the model directory (default: the workspace's merged model, models/merged; with --adapter: "
                         "the recipe's base model)")
    ap.add_argument("--base", action="store_true",
                    help="the recipe's base model (models/<recipe>/llm; internvl: models/internvl/model), "
                         "as before fine-tuning")
    ap.add_argument("--adapter", metavar="PATH",
                    help="a peft adapter put on the model unmerged, as `xtuner chat --adapter` (the workspace's: "
                         "models/adapter)")
    ap.add_argument("--recipe", choices=("assistant", "llava", "internvl"),
                    help="how to load and prompt the model (default: params.yaml's recipe)")
    ap.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml): recipe, "
                    "train.prompt_template, eval.system")
    ap.add_argument("--system", help="system prompt (default: params.yaml's eval.system)")
    ap.add_argument("--image", metavar="PATH", help="recipes llava and internvl: ask about this image")
    ap.add_argument("--prompt", metavar="TEXT", help="answer this one prompt, print only the answer, exit")
    ap.add_argument("--max-new-tokens", type=int, default=512, metavar="N",
                    help="longest answer in tokens (default: 512)")
    ap.add_argument("--backend", choices=("auto", "transformers", "lmdeploy"), default="transformers",
                    help="transformers (default), or lmdeploy in its own interpreter ($LMDEPLOY_PYTHON, a GPU "
                         "host); auto: lmdeploy where a GPU and $LMDEPLOY_PYTHON are there")
    ap.add_argument("--web", action="store_true", help="serve a Gradio chat page instead (pip install gradio)")
    ap.add_argument("--host", default="127.0.0.1", help="--web: address to bind (default: 127.0.0.1, this "
                    "machine only; 0.0.0.0 for every interface)")
    ap.add_argument("--port", type=int, default=7860, help="--web: port (default: 7860)")
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens: {args.max_new_tokens}; must be at least 1")
    if args.web and args.prompt is not None:
        fail("--web and --prompt: one or the other")
    if args.web:  # before loading anything: a missing Gradio is one line at once
        try:
            import gradio  # noqa: F401
        except ImportError:
            fail("--web needs Gradio: pip install gradio (or `pip install -e '.[web]'`; `make test` installs it)")
    p = P.load(args.params)
    args.recipe = args.recipe or p.recipe
    if args.recipe == "assistant":  # an unquantized text model, as evaluate's: no 4-bit kernels,
        from stages.xtuner_api import lean_imports  # DeepSpeed or images (stages/xtuner_api.py)

        lean_imports(images=False)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the library's deprecation notes are not the conversation
    args.system = p.eval.system if args.system is None else args.system
    image = Path(args.image) if args.image else None
    if args.image is None and args.recipe in IMAGE_RECIPES and not args.web:
        fail(f"recipe {args.recipe} answers about an image: give --image PATH (or use --web, which has an image input)")
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # what model code prints as it loads: stdout is the answer's
        model = load(args, p)
    try:
        if args.web:
            web(model, args, f"{describe(args)} (recipe {args.recipe})")
        elif args.prompt is not None:
            one_answer(model, args.prompt, image, args.max_new_tokens)
        else:
            print(f"[chat] {describe(args)}, recipe {args.recipe}: /reset clears the history, /exit or Ctrl-D "
                  "leaves", file=sys.stderr, flush=True)
            interactive(model, image, args.max_new_tokens)
    finally:
        if isinstance(model, LMDeployModel):
            model.close()


if __name__ == "__main__":
    from stages.errors import run

    run(main)

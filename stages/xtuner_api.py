"""The one door to XTuner: every import of xtuner goes through this module.

XTuner 0.2.0's stack needs a few fixes on these machines. Each lives here, applied at run time by
`patch_stack()` (never by editing site-packages), with a comment naming the error it prevents and a
test in tests/test_xtuner_api.py that fails without it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from stages.errors import fail, settle, verbose


@functools.cache
def patch_stack() -> None:
    """Apply every compatibility fix once, before xtuner is imported."""
    # bitsandbytes 0.50 tries, on CPUs with AVX512-BF16, to fetch a kernel from a hub (`kernels`
    # package), fails offline and says so on stderr at import; its own kernels are used instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    _torchvision_without_c_ops()
    _torch_cpu_bf16_query()
    # The fixes to bitsandbytes and transformers wait for the module they fix: importing them here would
    # cost every stage process 1.9 s (bitsandbytes alone 1.7 s), also those that never load a model.
    after_import("transformers.integrations.bitsandbytes", _bnb_backend_check)
    after_import("bitsandbytes.nn.modules", _bnb_cpu_packing_off)
    after_import("transformers.models.auto.auto_factory", _internlm2_generates_from_embeds)
    while_importing("bitsandbytes.backends.default.ops", _compile_on_first_call)
    while_importing("xtuner.dataset.internvl_dataset", _tokenizers_parallelism_kept)
    # No process-wide unpickling setting: checkpoints load with weights only (`weights_only_loads`);
    # only the trainer resuming from the pipeline's own checkpoint unpickles fully (`full_unpickling`).


_AFTER: dict[str, list[Callable[[Any], None]]] = {}
_AROUND: dict[str, list[Callable[[], contextlib.AbstractContextManager]]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Executes a module inside the contexts `while_importing` registered for it, then runs the functions
    `after_import` registered for it, before its importer sees it."""

    def find_spec(self, name, path, target=None):
        if name not in _AFTER and name not in _AROUND:
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(name, path, target)] if s is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module, _execute=execute, _name=name):
            with contextlib.ExitStack() as around:
                for context in _AROUND.pop(_name, []):
                    around.enter_context(context())
                _execute(module)
            for fix in _AFTER.pop(_name, []):
                fix(module)

        spec.loader.exec_module = exec_module  # this spec's own loader (one a module)
        return spec


def after_import(name: str, fix: Callable[[Any], None]) -> None:
    """`fix(module)` now when `name` is imported already, else right after its first import; nothing when
    it is hidden (`lean_imports`)."""
    if name in sys.modules:
        if sys.modules[name] is not None:
            fix(sys.modules[name])
        return
    _AFTER.setdefault(name, []).append(fix)
    _watch_imports()


def while_importing(name: str, context: Callable[[], contextlib.AbstractContextManager]) -> None:
    """`context()` around the first execution of module `name`; nothing when it is imported already."""
    if name in sys.modules:
        return
    _AROUND.setdefault(name, []).append(context)
    _watch_imports()


def _watch_imports() -> None:
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


@contextlib.contextmanager
def _tokenizers_parallelism_kept():
    """TOKENIZERS_PARALLELISM as it was before `xtuner/dataset/internvl_dataset.py` ran. That module sets it to
    "true" in a class body, so every `import xtuner.dataset` (each recipe's config, validate) turned the Rust
    tokenizers' threads on for the rest of the process: a datasets `map` over several processes (the train
    stage's on a GPU host, `map_num_proc` 8) then printed `Setting TOKENIZERS_PARALLELISM=false for forked
    processes.` on the terminal, once a map: 8 lines a train stage on the GPU machine. `stages.errors` sets it
    "false" where it is unset."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


@contextlib.contextmanager
def _compile_on_first_call():
    """bitsandbytes 0.50's default backend wraps four of its ops in `torch.compile` at import (fallbacks:
    a CPU or CUDA run with bitsandbytes' own library calls them only for odd shapes or block sizes).
    `torch.compile` imports TorchDynamo and Inductor when it is called, so every process that imports
    bitsandbytes paid for them: 1.1-1.2 s of CPU at each start of the CPU train stage. While that module
    runs, `torch.compile(fn)` gives a function that compiles `fn` the same way at its first call; where
    compiling fails, bitsandbytes' own wrapper falls back to `fn` then, as it did at import."""
    import torch

    compile_now = torch.compile

    def compile_later(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: compile_later(fn, **options)
        compiled = []

        @functools.wraps(model)
        def first_call(*args, **kwargs):
            if not compiled:
                compiled.append(compile_now(model, **options))
            return compiled[0](*args, **kwargs)

        return first_call

    torch.compile = compile_later
    try:
        yield
    finally:
        torch.compile = compile_now


LEAN = ("bitsandbytes", "deepspeed")
# transformers imports these optional packages wherever they are installed (sklearn for candidate
# generation, jax/flax for image transforms), and neither converting nor merging uses them; on the
# GPU host sklearn (with scipy and pandas) costs 1.1 s a process and jax 0.7 s, with bytecode cached
OPTIONAL = ("sklearn", "jax", "flax", "tensorflow")
# Nor does any of them build an optimizer: mmengine's optimizer package imports PyTorch's distributed
# optimizers (behind an ImportError guard, for ZeroRedundancyOptimizer) and with them FSDP's and DTensor's
# modules. Where no image is involved, scipy goes too: transformers' object-detection losses import it where
# it is installed (an is_scipy_available guard); XTuner's image datasets need it (through scikit-image).
# Both: 1.4 s of CPU in convert's imports here (benchmarks/import_times.py)
UNUSED = ("torch.distributed.optim",)
TEXT_ONLY = ("torchvision", "scipy")


def lean_imports(images: bool = True) -> None:
    """For the stages that convert or merge LoRA weights (convert, merge), which never touch 4-bit
    weights or DeepSpeed: both are made unimportable in this process, and peft, transformers and
    XTuner take their paths without them. On the GPU host their imports alone take 12 s and 14-19 s
    (benchmarks/import_times.py), most of what those stages took. transformers' optional
    integrations go too (OPTIONAL, UNUSED), and torchvision (0.9 s) and scipy where no image is involved
    (`images=False`: the text recipe). Call it before anything imports them; a module already imported
    stays."""
    hidden = [name for name in LEAN + OPTIONAL + UNUSED + (() if images else TEXT_ONLY)
              if name not in sys.modules and not (name == "scipy" and "transformers" in sys.modules)]
    # (transformers notes at its import whether scipy is installed, and would then import it unguarded)
    for name in hidden:
        sys.modules[name] = None
    _einops_torch_first(hidden)


def _einops_torch_first(hidden: list[str]) -> None:
    """Prevents `ModuleNotFoundError: import of tensorflow halted; None in sys.modules` when remote
    code (InternLM2's attention, InternViT) calls einops in a lean process: einops looks for a tensor's
    backend among the frameworks named in `sys.modules`, and the entries lean_imports leaves there
    (None) make it import them. Its torch backend is found once, with those entries out of sight, and
    einops then answers every torch tensor from its cache. That is done when einops is first imported (by
    the remote code, after torch), so that a lean process which loads no model (select reading back the
    scores made beside the trainer) imports no torch: 1.3 s of its 3 s on the CPU."""
    if importlib.util.find_spec("einops") is None:
        return

    def torch_first(_einops) -> None:
        import torch
        from einops import _backends

        saved = {name: sys.modules.pop(name) for name in hidden if sys.modules.get(name, 0) is None}
        try:
            _backends.get_backend(torch.empty(0))
        finally:
            sys.modules.update(saved)

    after_import("einops", torch_first)


def embeds_first(original):
    """InternLM2's `prepare_inputs_for_generation`, taking `inputs_embeds` on the first step.

    Prevents `RuntimeError: The size of tensor a (0) must match the size of tensor b (N)` in
    `_update_causal_mask` when an InternLM2 LLM generates from `inputs_embeds` alone (LLaVA's chat hook
    and evaluation, InternVL's chat): the remote code uses the embeddings only while
    `past_key_values is None`, but transformers 4.48's generate hands it an empty cache from the first
    step on, so the model got the empty `input_ids` instead."""
    if getattr(original, "_pipeline", False):
        return original

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
        out = original(self, input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                       inputs_embeds=inputs_embeds, **kwargs)
        empty = past_key_values is None or (hasattr(past_key_values, "get_seq_length")
                                            and past_key_values.get_seq_length() == 0)
        if inputs_embeds is not None and empty:
            out.pop("input_ids", None)
            out["inputs_embeds"] = inputs_embeds
        return out

    prepare_inputs_for_generation._pipeline = True
    return prepare_inputs_for_generation


def _internlm2_generates_from_embeds(auto_factory) -> None:
    """Every InternLM2ForCausalLM class transformers loads from a model directory's remote code gets
    `embeds_first` (a class loaded by another remote-code module's relative import, such as InternVL's
    composition, is that module's business: the InternVL stand-in's code does the same)."""
    original = auto_factory.get_class_from_dynamic_module
    if getattr(original, "_pipeline", False):
        return

    def get_class_from_dynamic_module(*args, **kwargs):
        cls = original(*args, **kwargs)
        if cls.__name__ == "InternLM2ForCausalLM" and "prepare_inputs_for_generation" in vars(cls):
            cls.prepare_inputs_for_generation = embeds_first(cls.prepare_inputs_for_generation)
        return cls

    get_class_from_dynamic_module._pipeline = True
    auto_factory.get_class_from_dynamic_module = get_class_from_dynamic_module


def _hidden(name: str) -> bool:
    return name in sys.modules and sys.modules[name] is None


def _bnb_cpu_packing_off(modules) -> None:
    """Prevents silently wrong QLoRA gradients on CPUs with AVX512-BF16 (bitsandbytes 0.50).

    A `Linear4bit` run in eval mode without grad (XTuner's EvaluateChatHook, before training starts)
    repacks its weight for a CPU inference kernel, for good; from then on `matmul_4bit` takes
    `gemv_4bit`, which has no autograd, and no gradient flows back through the 4-bit layers (only a
    warning, "an autograd kernel was not registered"). The first step's gradient norm of the
    assistant recipe was 4.85 instead of 12.51. Without the repacking the autograd path stays."""
    if getattr(modules.has_avx512bf16, "_pipeline", False):
        return

    def has_avx512bf16() -> bool:
        return False

    has_avx512bf16._pipeline = True
    modules.has_avx512bf16 = has_avx512bf16


def _torch_cpu_bf16_query() -> None:
    """Prevents `AttributeError: module 'torch.cpu' has no attribute 'is_bf16_supported'` when XTuner
    builds a model on CPU (its device helper asks the current device module for bf16 support)."""
    import torch

    if not hasattr(torch.cpu, "is_bf16_supported"):
        torch.cpu.is_bf16_supported = lambda *args, **kwargs: False


def _bnb_backend_check(module) -> None:
    """Prevents `AttributeError: 'frozenset' object has no attribute 'discard'` from transformers
    4.48's bitsandbytes backend check with bitsandbytes 0.50.2 (4-bit loading then fails on CPU).
    The real check runs first; only when it trips over that bug does a direct probe of
    bitsandbytes' 4-bit kernels decide."""
    original = module.validate_bnb_backend_availability
    if getattr(original, "_pipeline_patched", False):
        return

    def validate(raise_exception: bool = False) -> bool:
        try:
            return original(raise_exception=raise_exception)
        except AttributeError as err:
            if "discard" not in str(err):
                raise
        import bitsandbytes.functional as F
        import torch

        weight = torch.randn(64, 64)
        packed, state = F.quantize_4bit(weight, quant_type="nf4")
        return F.dequantize_4bit(packed, state).shape == weight.shape

    validate._pipeline_patched = True
    module.validate_bnb_backend_availability = validate
    integrations = sys.modules.get("transformers.integrations")  # its lazy module keeps what it handed out
    if integrations is not None and "validate_bnb_backend_availability" in vars(integrations):
        integrations.validate_bnb_backend_availability = validate


def _torchvision_without_c_ops() -> None:
    """Prevents `RuntimeError: operator torchvision::nms does not exist` on `import xtuner.dataset`.

    With CPU torch 2.13.0 pip settles on torchvision 0.28.0, whose compiled ops (`_C`) cannot load.
    torchvision then still registers fake kernels for `torchvision::nms`/`qnms`, which fails for ops
    that were never defined. Defining the two op schemas (what `_C` would define) lets the import
    succeed; image transforms work, `torchvision.ops` kernels do not (XTuner does not use them).
    Where `_C` loads (a matching GPU build), nothing is changed.
    """
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations)))
    libs = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    try:
        if libs:
            torch.ops.load_library(str(libs[0]))
            return
    except (OSError, RuntimeError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)  # a Library deregisters its ops when garbage-collected


_KEEP: list[Any] = []


@functools.cache
def prompt_templates() -> dict:
    """XTuner's PROMPT_TEMPLATE. Its module (xtuner/utils/templates.py) needs nothing but mmengine's
    ConfigDict, while importing it through its package (`xtuner.utils`) imports torch, transformers and
    XTuner's MoE helpers: 1.6 s of a validate stage's 3.3. So the installed file is run on its own, and
    through the package where that fails or the package is loaded already."""
    if "xtuner.utils" not in sys.modules:
        spec = importlib.util.find_spec("xtuner")
        path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "templates.py" if spec else None
        if path is not None and path.is_file():
            try:
                module_spec = importlib.util.spec_from_file_location("xtuner_prompt_templates", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
                return module.PROMPT_TEMPLATE
            except Exception:  # another XTuner's module layout: the package's way below
                pass
    patch_stack()
    from xtuner.utils import PROMPT_TEMPLATE

    return PROMPT_TEMPLATE


def prompt_template(name: str) -> dict:
    """XTuner's prompt template `name` (for example internlm2_chat), as a plain dict."""
    PROMPT_TEMPLATE = prompt_templates()
    if name not in PROMPT_TEMPLATE:
        close = [n for n in PROMPT_TEMPLATE if name.split("_")[0] in n][:6]
        fail(f"train.prompt_template: {name!r} is not an XTuner template "
             f"(for example: {', '.join(close or list(PROMPT_TEMPLATE)[:6])})")
    return dict(PROMPT_TEMPLATE[name])


def load_config(path: str | Path) -> Any:
    """Parse an XTuner config with mmengine, as `xtuner train` does; a broken one is one line."""
    patch_stack()
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path))
    except Exception as err:  # mmengine raises anything from SyntaxError to its own errors
        fail(f"{path}: mmengine cannot load the rendered config ({type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''})")


def read_pipeline(path: str | Path) -> dict:
    """The rendered config's `pipeline` dict (the settings render resolved), read as a literal without
    executing the config: no mmengine and no xtuner import, seconds saved where nothing else is needed."""
    import ast

    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pipeline" for t in node.targets):
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError) as err:
        fail(f"{path}: cannot read the rendered config ({type(err).__name__}); rerun `dvc repro render`")
    fail(f"{path}: no `pipeline` settings in the rendered config; rerun `dvc repro render`")


def run_trainer(config: Path, work_dir: Path, deepspeed: Path | None, resume: Path | None,
                launcher: str = "none") -> None:
    """XTuner's trainer (xtuner/tools/train.py), in this process. Not the `xtuner` command: it
    exits 0 when training fails, and a SIGTERM to it leaves the trainer running."""
    patch_stack()
    if deepspeed is not None and launcher == "none":
        # One process, no launcher: DeepSpeed reads its rank from these instead of asking MPI.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            os.environ.setdefault(key, value)
    argv = [str(config), "--work-dir", str(work_dir), "--launcher", launcher]
    if deepspeed is not None:
        argv += ["--deepspeed", str(deepspeed)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    from xtuner.tools import train

    _chat_hook_under_amp()
    _resume_randomness()
    after_import("mmengine.runner.loops", _epoch_turn_without_pause)
    # Only a resume reads a checkpoint that needs more than weights (models/work/, written by this
    # pipeline's trainer); a fresh run loads its pretrained_pth (models/pretrain/projector.pth) with
    # weights only, though XTuner asks torch for full unpickling.
    settle()  # stages/errors.py: the trainer's garbage collected as Python does
    with full_unpickling() if resume is not None else weights_only_loads():
        run_tool(train, "xtuner-train", argv, quiet=False)  # the train stage's quiet_trainer (stages/quiet.py)


def run_tool(module: Any, prog: str, argv: list[str], quiet: bool = True) -> None:
    """`module.main()` of an XTuner tool, in this process, as if run as `prog ARGV...`; with `quiet`,
    mmengine's notices (INFO, WARNING) kept off the terminal (`PIPELINE_VERBOSE=1`: shown)."""
    saved, sys.argv = sys.argv, [prog, *argv]
    try:
        with mmengine_errors_only() if quiet and not verbose() else contextlib.nullcontext():
            module.main()
    finally:
        sys.argv = saved


@contextlib.contextmanager
def mmengine_errors_only(on_log_file: Callable[[logging.FileHandler], None] | None = None):
    """mmengine's console handlers, of its loggers made before and during the block, at ERROR (their
    log files keep everything); `on_log_file` is called with each log file handler a logger opens.
    mmengine's checkpoint loading (Runner.load_checkpoint) passes no logger, and its print_log then print()s:
    a resumed run put "Loads checkpoint by local backend ..." and a line naming every frozen weight the
    adapter's checkpoint lacks on the terminal. Within the block those go to the current logger too."""
    from mmengine.logging import MMLogger
    from mmengine.runner import checkpoint as checkpoints

    def consoles(logger):
        return [h for h in logger.handlers if type(h) is logging.StreamHandler]

    init, print_log = MMLogger.__init__, checkpoints.print_log

    def to_a_logger(msg, logger=None, level=logging.INFO):
        return print_log(msg, logger="current" if logger is None else logger, level=level)

    def quiet_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for handler in consoles(self):
            handler.setLevel(logging.ERROR)
        for handler in self.handlers:
            if on_log_file is not None and isinstance(handler, logging.FileHandler):
                on_log_file(handler)

    before = [(h, h.level) for logger in MMLogger._instance_dict.values() for h in consoles(logger)]
    for handler, _ in before:
        handler.setLevel(logging.ERROR)
    MMLogger.__init__, checkpoints.print_log = quiet_init, to_a_logger
    try:
        yield
    finally:
        MMLogger.__init__, checkpoints.print_log = init, print_log
        for handler, level in before:
            handler.setLevel(level)


def _resume_randomness() -> None:
    """A resumed run trains as the uninterrupted one would, to the byte. mmengine's resume restores the
    seed, not the random generator's state, so LoRA dropout drew other masks after an interruption. A hook
    registered on every runner XTuner builds keeps torch's generator states (the CPU's, the GPUs') in each
    checkpoint's meta, and puts them back just before the first iteration of a resumed run (after the data
    loader has skipped the trained batches; in one process only: several keep their own states, and
    process 0 alone writes the checkpoint)."""
    from mmengine.hooks import Hook
    from mmengine.runner import FlexibleRunner, Runner

    if getattr(Runner.train, "_pipeline", False):
        return

    class ResumeRandomness(Hook):
        priority = "VERY_LOW"

        def __init__(self) -> None:
            self.pending = None

        def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
            import torch

            checkpoint.setdefault("meta", {})["pipeline_rng"] = {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

        def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
            if runner.world_size == 1:
                self.pending = (checkpoint.get("meta") or {}).get("pipeline_rng")

        def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
            if self.pending is not None:
                import torch

                torch.set_rng_state(self.pending["cpu"].cpu())
                if self.pending["cuda"] and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all([state.cpu() for state in self.pending["cuda"]])
                self.pending = None

    for cls in (Runner, FlexibleRunner):
        train = cls.train

        def patched(self, _train=train):
            self.register_hook(ResumeRandomness())
            return _train(self)

        patched._pipeline = True
        cls.train = patched


def _chat_hook_under_amp() -> None:
    """XTuner's EvaluateChatHook, patched twice.

    Under AMP: prevents `RuntimeError: expected scalar type Float but found BFloat16` when it chats with a
    LLaVA model on a GPU trained by mmengine's AMP wrapper (one GPU, no DeepSpeed, which would have cast the
    whole model). The LLM is bf16, the CLIP and projector float32, and the hook generates outside the
    autocast that training runs in: it now generates inside it.

    Out of the training's randomness: the hook samples (`do_sample=True`) from torch's global random
    generator, which LoRA dropout draws from too, before training, every `eval.interval` iterations and at
    every checkpoint; so the trained weights depended on `train.save_interval` and `eval.interval` (on the
    CPU, the adapter at iteration 50 differed between checkpoints every 25 and every 50 iterations). The
    generators' states (the CPU's, this process's GPU's) are put back after each chat.

    Every `eval.interval` iterations only: the hook also chats at every checkpoint, which the select stage
    scores on the same prompts and more; with a checkpoint every 25 iterations those chats took 13.5 s of
    the embedded default's 83 s training loop on the CPU (69 s without them, the same weights)."""
    from xtuner.engine.hooks import EvaluateChatHook

    generate = EvaluateChatHook._generate_samples
    if getattr(generate, "_pipeline", False):
        return
    EvaluateChatHook._is_save_checkpoint = lambda self, runner: False  # noqa: ARG005 (XTuner's signature)

    def _generate_samples(self, runner, *args, **kwargs):
        import torch

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            dtype = getattr(runner.optim_wrapper, "cast_dtype", None)  # set by AmpOptimWrapper only
            if dtype is None:
                return generate(self, runner, *args, **kwargs)
            from mmengine.runner.amp import autocast

            with autocast(dtype=dtype):
                return generate(self, runner, *args, **kwargs)

    _generate_samples._pipeline = True
    EvaluateChatHook._generate_samples = _generate_samples


class _EpochTurn(threading.local):
    """Whether the iterator in this thread turns an epoch over a loader without worker processes."""
    inline = False


_TURN = _EpochTurn()


class _LoopsClock:
    """mmengine.runner.loops' `time`, whose `sleep` skips the pause `_epoch_turn_without_pause` names."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if not _TURN.inline:
            time.sleep(seconds)


def _epoch_turn_without_pause(loops) -> None:
    """mmengine's iteration-based loop sleeps 2 s wherever its data loader runs out (`time.sleep(2)` in
    `_InfiniteDataloaderIterator.__next__`, against a deadlock of worker processes restarting). The rendered
    configs load data in the training process (`dataloader_num_workers = 0`): there is no worker to wait
    for, and the pause was dead time at every epoch's turn, 6 s of the embedded default's training on the
    CPU (4 epochs) and 2 s an epoch on a GPU. With worker processes (a config edited to use them) the pause
    stays."""
    step = loops._InfiniteDataloaderIterator.__next__
    if getattr(step, "_pipeline", False):
        return

    def __next__(self):
        _TURN.inline = getattr(self._dataloader, "num_workers", 1) == 0
        try:
            return step(self)
        finally:
            _TURN.inline = False

    __next__._pipeline = True
    loops._InfiniteDataloaderIterator.__next__ = __next__
    loops.time = _LoopsClock()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_checkpoint_weights(path: Path, key: str | None = None) -> dict:
    """The model weights of an XTuner checkpoint (a .pth file, or a DeepSpeed checkpoint folder);
    for a LoRA run these are the adapter's weights only. Read with weights only (`weights_only_loads`):
    a file whose pickle would run code is refused, in one line naming it (`key`: the param it came from)."""
    patch_stack()
    import pickle

    from xtuner.model.utils import guess_load_checkpoint

    where = f"{key}: {path}" if key else str(path)
    if Path(path).is_dir() and not _hidden("deepspeed"):
        import deepspeed  # noqa: F401  (its classes are allowed by name in a DeepSpeed checkpoint)
    try:
        with weights_only_loads():
            return dict(guess_load_checkpoint(str(path)))
    except pickle.UnpicklingError as err:
        fail(f"{where}: refused: its pickle would call {_unsafe_global(path, err)}, which a checkpoint of weights "
             "never needs (read with torch.load(weights_only=True); nothing in it ran)")
    except Exception as err:  # torch and DeepSpeed raise many kinds on a damaged file
        fail(f"{where}: not a readable XTuner checkpoint ({type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''})")


def _unsafe_global(path: Path, err: Exception) -> str:
    """The global a refused pickle names (read from its opcodes, nothing run), else torch's word for it."""
    import re

    import torch

    if Path(path).is_file():
        with contextlib.suppress(Exception):
            allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in checkpoint_globals()}
            names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
            if names:
                return ", ".join(names)
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else "code"


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load in the block reads weights only (`TORCH_FORCE_WEIGHTS_ONLY_LOAD`: also the calls
    that ask for `weights_only=False`, as XTuner's guess_load_checkpoint and its DeepSpeed-folder reader
    do), with the few globals an XTuner checkpoint names beyond torch's own allowed by name
    (`checkpoint_globals`). A pickle that names any other global is refused before anything in it runs."""
    import torch

    with _environ(TORCH_FORCE_WEIGHTS_ONLY_LOAD="1", TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=None), \
            torch.serialization.safe_globals(checkpoint_globals()):
        yield


@contextlib.contextmanager
def full_unpickling():
    """Prevents `UnpicklingError: Weights only load failed ... HistoryBuffer` when XTuner's trainer
    resumes (torch >= 2.6 loads weights only by default; mmengine and DeepSpeed resume with torch's
    default): for the trainer's resume from models/work/ only, a checkpoint this pipeline wrote."""
    with _environ(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", TORCH_FORCE_WEIGHTS_ONLY_LOAD=None):
        yield


@contextlib.contextmanager
def _environ(**values: str | None):
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def checkpoint_globals() -> list:
    """What an XTuner/mmengine checkpoint pickles beyond tensors and plain data, allowed by name for
    weights-only loading: numpy arrays, scalars and dtypes (mmengine's meta and message hub; numpy 1 and
    2 spell the module differently), mmengine's HistoryBuffer, and the `getattr(HistoryBuffer, 'min')`
    that names its statistics (a getattr that fetches nothing else). With DeepSpeed imported, its
    ZeRO stage and loss-scaler classes (a DeepSpeed checkpoint's optimizer files)."""
    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype, HistoryBuffer, (_history_buffer_statistic, "builtins.getattr")]
    allowed += [type(np.dtype(t)) for t in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8",
                                             "O", "U", "S")]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    if sys.modules.get("deepspeed") is not None:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum]
    return allowed


def _history_buffer_statistic(obj: Any, name: str) -> Any:
    """builtins.getattr as mmengine's checkpoints use it: a statistic method of HistoryBuffer, nothing else."""
    import pickle

    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in {"min", "max", "mean", "current", *getattr(HistoryBuffer, "_statistics_methods", {})}:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"GLOBAL builtins.getattr of {type(obj).__name__}.{name} is not allowed")


def pth_to_hf(config: Path, pth: Path, out: Path, fp32: bool) -> None:
    """XTuner's pth_to_hf converter, in this process, from the same rendered config as training
    (never other options: it rebuilds the model from the config).

    One change: the LLM is built without its quantization_config. pth_to_hf builds a quantized model
    for real (reading and quantizing every base weight: most of its 29 s for the 1.8B model on the
    H100) only to save the LoRA weights of the checkpoint, which do not depend on the base weights.
    Without quantization the tool takes its own meta-device path and reads no base weight; the
    adapter it writes is byte for byte the same (tests/test_xtuner_api.py)."""
    patch_stack()
    from xtuner.tools.model_converters import pth_to_hf as tool

    argv = [str(config), str(pth), str(out), "--safe-serialization"] + (["--fp32"] if fp32 else [])
    saved_config, tool.Config = tool.Config, _ConfigWithoutQuantization
    saved_bar, tool.tqdm = tool.tqdm, (tool.tqdm if verbose() else lambda items, **_: items)  # "Load State Dict"
    try:
        with weights_only_loads():
            run_tool(tool, "xtuner-pth_to_hf", argv)
    finally:
        tool.Config, tool.tqdm = saved_config, saved_bar


class _ConfigWithoutQuantization:
    """mmengine's Config.fromfile for pth_to_hf, less the LLM's quantization_config (see pth_to_hf)."""

    @staticmethod
    def fromfile(path: str, *args: Any, **kwargs: Any) -> Any:
        from mmengine.config import Config

        cfg = Config.fromfile(path, *args, **kwargs)
        llm = cfg.get("model", {}).get("llm")
        if llm is not None:
            llm.pop("quantization_config", None)
        return cfg


# ---------------------------------------------------------------------------------------------
# InternVL (recipe internvl)


_INTERNVL_DTYPE: list[str] = []


def patch_internvl(torch_dtype: str) -> None:
    """XTuner's InternVL_V1_5 as the run was rendered for (`torch_dtype`: float32 on CPU), in one process.

    - It loads the model with `torch_dtype=torch.bfloat16`, 4-bit compute in float16 and
      `flash_attention_2` forced into `llm_config`: on a CPU (no flash-attn, no fast bf16) that fails
      (`ImportError: ... flash_attn ...`) or trains in another precision than rendered. Its
      `AutoModel` is given a loader that uses `torch_dtype` for both, and keeps flash_attention_2 only
      where flash-attn is importable and a GPU is visible (else SDPA for InternLM2, eager for others).
    - Its `_llm_forward` calls `torch.distributed.get_rank()` unconditionally: `ValueError: Default
      process group has not been initialized` in a single-process run. get_rank answers 0 when no
      process group exists (what a single process is), and asks the group otherwise.
    """
    patch_stack()
    import torch
    import transformers
    import xtuner.model.internvl as internvl

    _INTERNVL_DTYPE[:] = [torch_dtype]
    dist = torch.distributed
    if not getattr(dist.get_rank, "_pipeline", False):
        original = dist.get_rank

        def get_rank(group=None):
            return original(group) if dist.is_available() and dist.is_initialized() else 0

        get_rank._pipeline = True
        dist.get_rank = get_rank
    if getattr(internvl.AutoModel, "_pipeline", False):
        return

    class AutoModel:
        """transformers.AutoModel with the rendered dtype and an attention that runs here."""

        _pipeline = True

        @staticmethod
        def from_pretrained(path, torch_dtype=None, quantization_config=None, config=None, **kwargs):
            dtype = getattr(torch, _INTERNVL_DTYPE[0])
            if quantization_config is not None:
                quantization_config.bnb_4bit_compute_dtype = dtype
            llm = getattr(config, "llm_config", None)
            if llm is not None and not _flash_attention_usable():
                if getattr(llm, "model_type", "") == "internlm2":  # InternLM2's remote code reads this one:
                    llm.attn_implementation = "sdpa"  # its SDPA class, same weights (stages/kernels.py use_sdpa)
                    llm._attn_implementation = "sdpa"
                else:
                    llm._attn_implementation = "eager"
            return transformers.AutoModel.from_pretrained(path, torch_dtype=dtype, quantization_config=quantization_config,
                                                          config=config, **kwargs)

    internvl.AutoModel = AutoModel
    _internvl_trainable_in_float32(internvl.InternVL_V1_5)


def _internvl_trainable_in_float32(model_class: Any) -> None:
    """Prevents `NotImplementedError: "_amp_foreach_non_finite_check_and_unscale_cuda" not implemented
    for 'BFloat16'` when InternVL trains in bf16 on one GPU with mmengine's AMP wrapper (the tutorial's
    DeepSpeed keeps float32 master weights; without it the LoRA and mlp1 weights were bf16, and so were
    their gradients and AdamW's updates). The trainable weights are made float32 once the model is built;
    the frozen ones keep the rendered dtype, and autocast runs the matmuls in bf16."""
    import torch

    init = model_class.__init__
    if getattr(init, "_pipeline", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for param in self.parameters():
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()

    __init__._pipeline = True
    model_class.__init__ = __init__


def _flash_attention_usable() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def internvl_tiles(size: tuple[int, int], min_num: int, max_num: int, image_size: int, thumbnail: bool) -> int:
    """Tiles XTuner's InternVL dataset cuts an image of `size` (w, h) into (its own function; the thumbnail
    counted only where it adds one: more than one tile)."""
    patch_stack()
    from xtuner.dataset.internvl_dataset import total_image_token

    tiles = total_image_token(size, min_num, max_num, image_size, use_thumbnail=False)
    return tiles + (1 if thumbnail and tiles > 1 else 0)


def convert_to_official(config: Path, pth: Path, out: Path, torch_dtype: str) -> None:
    """XTuner's `xtuner/configs/internvl/v1_5/convert_to_official.py CONFIG PTH OUT`, in this process:
    the model rebuilt from the config without quantization, the checkpoint loaded, LoRA merged, saved in
    bfloat16 with the tokenizer. It does not copy the model's remote code (the caller does)."""
    patch_internvl(torch_dtype)
    script = xtuner_folder() / "configs/internvl/v1_5/convert_to_official.py"
    if not script.is_file():
        fail(f"{script}: not found; XTuner 0.2.0's InternVL converter is needed")
    module_spec = importlib.util.spec_from_file_location("xtuner_convert_to_official", script)
    tool = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(tool)
    with weights_only_loads():
        run_tool(tool, "convert_to_official.py", [str(config), str(pth), str(out)])


def final_checkpoint(work: Path) -> Path:
    last = work / "last_checkpoint"
    if not last.is_file():
        fail(f"{work}: training ended without a checkpoint (see the log above)")
    return Path(last.read_text().strip())


def save_adapter(ckpt: Path, out: Path, before: Path | None = None) -> int:
    """The final checkpoint's model weights alone (a QLoRA run's adapter), atomically; with `before`
    (the llava recipe's projector.pth), that file's weights too, under `projector_before`: the evaluate
    stage's model before fine-tuning."""
    return save_weights(load_checkpoint_weights(ckpt), out, before)


def save_weights(weights: dict, out: Path, before: Path | None = None) -> int:
    """`weights` (a checkpoint's model weights, on the CPU) saved as `save_adapter` saves them, atomically;
    (the number of values in them)."""
    from stages.io import write_torch

    out.parent.mkdir(parents=True, exist_ok=True)
    write_torch(out, adapter_file(weights, before))
    return sum(t.numel() for t in weights.values())


def adapter_file(weights: dict, before: Path | None = None) -> dict:
    """What an adapter file of models/checkpoints/ holds: the weights by name; with `before`, that file's
    weights under `projector_before`."""
    import torch

    saved = {"state_dict": dict(sorted(weights.items()))}
    if before is not None:
        saved["projector_before"] = torch.load(before, map_location="cpu", weights_only=True)["state_dict"]
    return saved


def sort_targets(folder: Path) -> None:
    """adapter_config.json's `target_modules` sorted, so the file is the same on every rerun."""
    import json

    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    from stages.io import write_json

    write_json(cfg_path, cfg)


def xtuner_folder() -> Path:
    """The installed XTuner package's folder (its model code and configs are read from there)."""
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        fail("xtuner is not installed: the InternLM2 and InternViT model code comes from XTuner 0.2.0's package")
    return Path(next(iter(spec.submodule_search_locations)))

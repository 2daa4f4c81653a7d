"""Seconds each set of imports takes in a fresh interpreter: the start-up cost that convert and merge
pay before any work (run twice: the first run may also write bytecode caches).

    python -m benchmarks.import_times                       # every set
    python -m benchmarks.import_times torch "merge's, lean"  # the sets named
"""
import subprocess
import sys
import time

SETS = {
    "torch": "import torch",
    "torch + CUDA init": "import torch; torch.cuda.init()",
    "bitsandbytes": "import bitsandbytes",
    "deepspeed": "import deepspeed",
    "patch_stack": "from stages.xtuner_api import patch_stack; patch_stack()",
    "merge's (peft, transformers)": "from stages.xtuner_api import patch_stack; patch_stack(); "
                                    "from peft import PeftModel; from transformers import AutoModelForCausalLM",
    "convert's (xtuner pth_to_hf)": "from stages.xtuner_api import patch_stack; patch_stack(); "
                                    "from xtuner.tools.model_converters import pth_to_hf",
    "merge's, lean": "from stages.xtuner_api import lean_imports, patch_stack; lean_imports(images=False); patch_stack(); "
                     "from peft import PeftModel; from transformers import AutoModelForCausalLM",
    "convert's, lean": "from stages.xtuner_api import lean_imports, patch_stack; lean_imports(images=False); patch_stack(); "
                       "from xtuner.tools.model_converters import pth_to_hf",
}


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_times", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="SET", help=f"import sets to time (default: all): {', '.join(SETS)}")
    names = parser.parse_args(argv).names
    unknown = [name for name in names if name not in SETS]
    if unknown:
        parser.error(f"unknown import set {unknown[0]!r}; known: {', '.join(SETS)}")
    for name, code in SETS.items():
        if names and name not in names:
            continue
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        status = "" if proc.returncode == 0 else f" (failed: {proc.stderr.strip().splitlines()[-1][:80]})"
        print(f"{time.time() - start:6.2f} s  {name}{status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""How the scorer's base model loads on a GPU host: seconds and CPU seconds for each way, each in a fresh process,
the ways alternated (what a scorer beside a host-bound trainer takes from the host's cores while it loads).

    python -m benchmarks.scorer_load MODEL_DIR [--rounds 2] [--out results.jsonl]

Ways: `to`: loaded on the host in bf16, then moved (stages/generation.py TransformersChat, as it is);
`to, 1 thread`: the same with torch on one CPU thread (the scorer beside the trainer); `device_map`: transformers
places each tensor on the GPU as it reads it (needs accelerate)."""
import argparse
import json
import subprocess
import sys

WAYS = {
    "to": "m = load_model(path, 'm', torch_dtype=torch.bfloat16).to('cuda')",
    "to, 1 thread": "torch.set_num_threads(1); m = load_model(path, 'm', torch_dtype=torch.bfloat16).to('cuda')",
    "device_map": "m = load_model(path, 'm', torch_dtype=torch.bfloat16, device_map={'': 'cuda'})",
}
CHILD = """
import json, resource, sys, time
t0 = time.time()
import torch
from stages.xtuner_api import lean_imports
lean_imports(images=False)
from stages.modeldir import load_model
torch.cuda.init()
path = sys.argv[1]
r0 = resource.getrusage(resource.RUSAGE_SELF); t1 = time.time()
{way}
torch.cuda.synchronize()
r1 = resource.getrusage(resource.RUSAGE_SELF); t2 = time.time()
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({{"load_s": round(t2 - t1, 2), "load_cpu_s": round(cpu, 2), "cores_busy": round(cpu / (t2 - t1), 1),
                  "imports_s": round(t1 - t0, 2), "gpu_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
                  "dtype": str(next(m.parameters()).dtype)}}))
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scorer_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for r in range(args.rounds):
        for name, way in WAYS.items():
            proc = subprocess.run([sys.executable, "-c", CHILD.format(way=way), args.model], capture_output=True, text=True)
            rec = {"way": name, "round": r + 1}
            if proc.returncode == 0:
                rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                rec["error"] = proc.stderr.strip().splitlines()[-1:]
            print(json.dumps(rec), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Stage `repeat`: LLaVA-format data repeated n times, as the tutorial's `repeat.py -i -o -n 200`.

Reads `data.llava.source` (records with `image` and `conversations`), checks every record first
(images decode, one `<image>` per image sample, turns alternate), and writes the records
`data.llava.repeat` times over, each copy with its own id (`<id>_<copy>`).

    python -m stages.repeat          # writes data/generated/llava/repeated_data.json
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.checks import check_records, raise_problems
from stages.io import read_json, write_json
from stages.paths import LLAVA_REPEATED


def repeat(records: list[dict], n: int) -> list[dict]:
    """`records` n times over, ids made unique; pure."""
    out = []
    for copy in range(n):
        for i, rec in enumerate(records):
            out.append({**rec, "id": f"{rec.get('id', i)}_{copy}"})
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.repeat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=str(P.PARAMS), help="params file (default: params.yaml)")
    parser.add_argument("--out", default=str(LLAVA_REPEATED), help=f"output (default: {LLAVA_REPEATED})")
    args = parser.parse_args(argv)
    llava = P.load(args.params).data.llava
    P.log_section("repeat", llava)
    records = read_json(Path(llava.source), "data.llava.source")
    raise_problems(check_records(records, llava.source, "llava", Path(llava.image_folder)))
    out = repeat(records, llava.repeat)
    write_json(Path(args.out), out, indent=None)
    print(f"[repeat] {args.out}: {len(records)} records x {llava.repeat} = {len(out)}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="repeat")

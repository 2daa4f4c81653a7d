"""Stage `repeat`: LLaVA-format data repeated n times, as the tutorial's `repeat.py -i -o -n 200`.

Reads `data.llava.source` (records with `image` and `conversations`), checks every record first
(images decode, one `<image>` per image sample, turns alternate), and writes the records
`data.llava.repeat` times over, each copy with its own id (`<id>_<copy>`). The same for the internvl
recipe's CLoT-style records (`data.internvl`, same format).

    python -m stages.repeat          # writes data/generated/{llava,internvl}/repeated_data.json
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from stages import params as P
from stages.checks import check_records, raise_problems
from stages.io import read_json, write_json
from stages.paths import INTERNVL_REPEATED, LLAVA_REPEATED


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
    parser.add_argument("--internvl-out", default=str(INTERNVL_REPEATED),
                        help=f"output of data.internvl (default: {INTERNVL_REPEATED})")
    args = parser.parse_args(argv)
    data = P.load(args.params).data
    for key, section, out_path in (("llava", data.llava, args.out), ("internvl", data.internvl, args.internvl_out)):
        P.log_section("repeat", section)
        records = read_json(Path(section.source), f"data.{key}.source")
        raise_problems(check_records(records, section.source, "llava", Path(section.image_folder)))
        out = repeat(records, section.repeat)
        write_json(Path(out_path), out, indent=None)
        print(f"[repeat] {out_path}: {len(records)} records x {section.repeat} = {len(out)}", flush=True)


if __name__ == "__main__":
    from stages.errors import run

    run(main, stage="repeat")

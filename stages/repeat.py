"""The image recipes' data preparation: LLaVA-format data repeated n times, as the tutorial's
`repeat.py -i -o -n 200`.

Reads `data.llava.source` (records with `image` and `conversations`), checks every record first
(images decode, one `<image>` per image sample, turns alternate), and writes the records
`data.llava.repeat` times over, each copy with its own id (`<id>_<copy>`). The same for the internvl
recipe's CLoT-style records (`data.internvl`, same format). The stage is `prepare`.
"""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.checks import check_records, raise_problems
from stages.io import read_json, write_json


def repeat(records: list[dict], n: int) -> list[dict]:
    """`records` n times over, ids made unique; pure."""
    out = []
    for copy in range(n):
        for i, rec in enumerate(records):
            out.append({**rec, "id": f"{rec.get('id', i)}_{copy}"})
    return out


def write(section: P.Llava, key: str, out: Path) -> str:
    """Stage prepare for an image recipe: `section`'s records checked, repeated, written to `out`."""
    P.log_section("prepare", section)
    records = read_json(Path(section.source), f"{key}.source")
    raise_problems(check_records(records, section.source, "llava", Path(section.image_folder)))
    repeated = repeat(records, section.repeat)
    write_json(out, repeated, indent=None)
    return f"{out}: {len(records)} records x {section.repeat} = {len(repeated)}"

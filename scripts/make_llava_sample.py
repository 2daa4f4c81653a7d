"""Write the small LLaVA-format sample the project ships in data/raw/llava/ (run once; committed).

Synthetic pictures (a coloured shape on a plain background) and conversations that describe them,
in the format of the tutorial's `unique_data.json`: records with `id`, `image` (relative to the
image folder) and `conversations` whose first human turn holds exactly one `<image>`.

    python scripts/make_llava_sample.py [--out data/raw/llava]
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
COLOURS = {"red": ((220, 40, 40), "红色"), "green": ((40, 170, 70), "绿色"),
           "blue": ((40, 80, 220), "蓝色"), "yellow": ((235, 200, 40), "黄色")}
BACKGROUNDS = {"white": ((250, 250, 250), "白色"), "black": ((15, 15, 15), "黑色")}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}


def draw(shape: str, colour: tuple, background: tuple) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    box = (24, 24, SIZE - 24, SIZE - 24)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(SIZE // 2, 20), (SIZE - 20, SIZE - 24), (20, SIZE - 24)], fill=colour)
    return img


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/raw/llava")
    out = Path(parser.parse_args().out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    combos = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]
    for i, (shape, colour, bg) in enumerate(combos[::3]):  # 8 of the 24 combinations
        name = f"images/{colour}_{shape}_on_{bg}.png"
        draw(shape, COLOURS[colour][0], BACKGROUNDS[bg][0]).save(out / name, optimize=True)
        zh = i % 2 == 0
        if zh:
            turns = [("<image>\n请描述这张图片。",
                      f"图片中是一个{COLOURS[colour][1]}的{SHAPES[shape]}，背景是{BACKGROUNDS[bg][1]}的。"),
                     ("图中的形状是什么颜色？", f"{COLOURS[colour][1]}。")]
        else:
            turns = [("<image>\nWhat is in this picture?", f"A {colour} {shape} on a {bg} background."),
                     ("What shape is it?", f"It is a {shape}.")]
        conv = []
        for q, a in turns[: 1 + i % 2]:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": str(i), "image": name, "conversations": conv})
    (out / "unique_data.json").write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    print(f"{out}: {len(records)} records")


if __name__ == "__main__":
    main()

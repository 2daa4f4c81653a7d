"""Write the small CLoT-style sample the project ships in data/raw/internvl/ (run once; committed).

The tutorial fine-tunes InternVL2-2B on CLoT_cn_2000 (`ex_cn.json`: an image and a witty caption per
record, asked "请你根据这张图片，讲一个脑洞大开的梗"). This is the same format with the project's own
synthetic pictures (simple drawn characters, 128 px, a few hundred bytes each) and its own captions:
records with `id`, `image` (relative to the image folder) and `conversations` whose human turn holds
exactly one `<image>`, as XTuner's InternVL_V1_5_Dataset reads them.

    python scripts/make_internvl_sample.py [--out data/raw/internvl]
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


def face(d, fill, eyes="open", mouth="smile"):
    d.ellipse((24, 24, 104, 104), fill=fill, outline=(20, 20, 20), width=2)
    for x in (48, 80):
        if eyes == "open":
            d.ellipse((x - 5, 50, x + 5, 60), fill=(20, 20, 20))
        else:
            d.line((x - 7, 56, x + 7, 56), fill=(20, 20, 20), width=3)
    if mouth == "open":
        d.ellipse((50, 70, 78, 96), fill=(120, 20, 20))
    elif mouth == "flat":
        d.line((50, 82, 78, 82), fill=(20, 20, 20), width=3)
    else:
        d.arc((44, 60, 84, 92), 20, 160, fill=(20, 20, 20), width=3)


def surprised(d):
    face(d, (250, 210, 60), mouth="open")


def sleepy_cat(d):
    d.polygon([(30, 44), (40, 14), (56, 34)], fill=(160, 160, 160))
    d.polygon([(98, 44), (88, 14), (72, 34)], fill=(160, 160, 160))
    face(d, (160, 160, 160), eyes="closed", mouth="flat")


def cool_sun(d):
    for i in range(8):
        x, y = [(64, 6), (110, 20), (122, 64), (110, 108), (64, 122), (18, 108), (6, 64), (18, 20)][i]
        d.line((64, 64, x, y), fill=(250, 150, 0), width=4)
    face(d, (250, 190, 0))
    d.rectangle((36, 46, 92, 62), fill=(10, 10, 10))


def fish_bowl(d):
    d.ellipse((14, 20, 114, 120), fill=(170, 220, 250), outline=(60, 120, 200), width=3)
    d.ellipse((40, 56, 84, 84), fill=(240, 90, 40))
    d.polygon([(84, 70), (102, 56), (102, 84)], fill=(240, 90, 40))
    d.ellipse((48, 64, 54, 70), fill=(10, 10, 10))


def frog(d):
    d.ellipse((30, 18, 56, 44), fill=(60, 180, 70))
    d.ellipse((72, 18, 98, 44), fill=(60, 180, 70))
    face(d, (60, 180, 70), mouth="flat")


def pig(d):
    face(d, (250, 170, 190))
    d.ellipse((50, 64, 78, 84), fill=(230, 120, 150))


def moon(d):
    d.ellipse((20, 20, 100, 100), fill=(250, 240, 150))
    d.ellipse((44, 12, 124, 92), fill=(20, 30, 70))
    d.text((92, 96), "z z z", fill=(250, 250, 250))


def snowman(d):
    d.ellipse((36, 58, 92, 118), fill=(250, 250, 250))
    d.ellipse((46, 20, 82, 56), fill=(250, 250, 250))
    d.polygon([(64, 38), (80, 42), (64, 44)], fill=(240, 120, 0))
    d.ellipse((30, 108, 98, 124), fill=(200, 230, 250))


SCENES = [  # name, background, drawing, caption
    ("surprised_face", (40, 90, 200), surprised, "当你发现周一其实只是周五的前四天：啊——！"),
    ("sleepy_cat", (250, 230, 200), sleepy_cat, "猫：我不是在睡觉，我是在给梦充电。"),
    ("cool_sun", (120, 200, 250), cool_sun, "太阳：戴墨镜不是耍酷，是我被自己闪到了。"),
    ("fish_bowl", (250, 250, 250), fish_bowl, "鱼：每天绕缸一圈，就算出门旅游了。"),
    ("frog", (230, 250, 230), frog, "青蛙：别看我，我在认真思考呱生。"),
    ("pig", (250, 250, 200), pig, "猪：减肥从明天开始，而明天永远是明天。"),
    ("moon", (20, 30, 70), moon, "月亮：上夜班的打工人，白天请勿打扰。"),
    ("snowman", (250, 170, 90), snowman, "雪人：我不是胖了，是在慢慢融入社会。"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/raw/internvl")
    out = Path(parser.parse_args().out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, background, paint, caption) in enumerate(SCENES):
        img = Image.new("RGB", (SIZE, SIZE), background)
        paint(ImageDraw.Draw(img))
        path = f"images/{name}.png"
        img.quantize(colors=16).save(out / path, optimize=True)
        records.append({"id": f"clot_{i}", "image": path, "conversations": [
            {"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": caption}]})
    (out / "unique_data.json").write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n",
                                          encoding="utf-8")
    print(f"{out}: {len(records)} records")


if __name__ == "__main__":
    main()

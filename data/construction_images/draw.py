"""Draws the construction drawing symbols in this folder and writes their rows (train.jsonl, eval.jsonl).

Run from the repository root: `python data/construction_images/draw.py`. Every image is drawn here with PIL from
simple shapes (no photographs, nothing copied), in several variants (size, position, line width, tint), so the
held-out rows show each symbol in a drawing the training rows never used.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

FOLDER = Path(__file__).resolve().parent
SIZE = 96
QUESTIONS = [
    "이 도면 기호가 나타내는 것은 무엇입니까?",
    "다음 그림의 건설 도면 기호를 설명하세요.",
    "이 기호는 도면에서 무엇을 뜻합니까?",
]
EVAL_QUESTION = "도면에 그려진 이 기호의 이름과 뜻을 말하세요."


def h_beam(d, box, w, ink):
    x0, y0, x1, y1 = box
    t = max(3, (x1 - x0) // 6)
    d.rectangle((x0, y0, x1, y0 + t), fill=ink)
    d.rectangle((x0, y1 - t, x1, y1), fill=ink)
    cx = (x0 + x1) // 2
    d.rectangle((cx - t // 2, y0, cx + t // 2, y1), fill=ink)


def steel_pipe(d, box, w, ink):
    d.ellipse(box, outline=ink, width=max(3, w + 2))


def rebar(d, box, w, ink):
    x0, y0, x1, y1 = box
    d.ellipse(box, fill=ink)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    for k in range(8):
        a = k * math.pi / 4
        px, py = cx + (r + 3) * math.cos(a), cy + (r + 3) * math.sin(a)
        d.ellipse((px - 3, py - 3, px + 3, py + 3), fill=ink)


def concrete(d, box, w, ink):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline=ink, width=w)
    rng = random.Random(x0 * 7 + y0)
    for _ in range(14):
        px, py = rng.uniform(x0 + 6, x1 - 6), rng.uniform(y0 + 6, y1 - 6)
        d.polygon([(px, py - 4), (px - 4, py + 3), (px + 4, py + 3)], outline=ink)


def brick(d, box, w, ink):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline=ink, width=w)
    rows = 5
    h = (y1 - y0) / rows
    for r in range(1, rows):
        d.line((x0, y0 + r * h, x1, y0 + r * h), fill=ink, width=max(1, w - 1))
    for r in range(rows):
        offset = 0 if r % 2 else (x1 - x0) / 4
        for k in range(3):
            x = x0 + offset + k * (x1 - x0) / 2
            if x0 < x < x1:
                d.line((x, y0 + r * h, x, y0 + (r + 1) * h), fill=ink, width=max(1, w - 1))


def north_arrow(d, box, w, ink):
    x0, y0, x1, y1 = box
    cx = (x0 + x1) / 2
    d.polygon([(cx, y0), (x0 + (x1 - x0) * 0.2, y1), (cx, y1 - (y1 - y0) * 0.3)], fill=ink)
    d.polygon([(cx, y0), (x1 - (x1 - x0) * 0.2, y1), (cx, y1 - (y1 - y0) * 0.3)], outline=ink, width=w)


def section_mark(d, box, w, ink):
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = (x1 - x0) / 4
    d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=w)
    d.line((cx - r, cy, cx + r, cy), fill=ink, width=w)
    d.line((x0, cy, cx - r, cy), fill=ink, width=w + 1)
    d.polygon([(x0, cy - 8), (x0 + 10, cy), (x0, cy + 8)], fill=ink)


def door(d, box, w, ink):
    x0, y0, x1, y1 = box
    d.line((x0, y1, x1, y1), fill=ink, width=w)
    d.line((x0, y1, x0, y0), fill=ink, width=w)
    d.arc((x0 - (x1 - x0), y0, x1, y1 + (y1 - y0)), 270, 360, fill=ink, width=max(1, w - 1))


def window(d, box, w, ink):
    x0, y0, x1, y1 = box
    cy = (y0 + y1) / 2
    d.rectangle((x0, cy - 14, x0 + 10, cy + 14), fill=ink)
    d.rectangle((x1 - 10, cy - 14, x1, cy + 14), fill=ink)
    for dy in (-8, 0, 8):
        d.line((x0 + 10, cy + dy, x1 - 10, cy + dy), fill=ink, width=max(1, w - 1))


def stairs(d, box, w, ink):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline=ink, width=w)
    steps = 6
    for k in range(1, steps):
        y = y0 + k * (y1 - y0) / steps
        d.line((x0, y, x1, y), fill=ink, width=max(1, w - 1))
    cx = (x0 + x1) / 2
    d.line((cx, y1 - 4, cx, y0 + 6), fill=ink, width=w)
    d.polygon([(cx - 6, y0 + 12), (cx + 6, y0 + 12), (cx, y0 + 2)], fill=ink)


def warning_sign(d, box, w, ink):
    x0, y0, x1, y1 = box
    cx = (x0 + x1) / 2
    d.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=(250, 200, 30), outline=(20, 20, 20))
    d.rectangle((cx - 3, y0 + (y1 - y0) * 0.35, cx + 3, y0 + (y1 - y0) * 0.7), fill=(20, 20, 20))
    d.ellipse((cx - 3, y1 - 12, cx + 3, y1 - 6), fill=(20, 20, 20))


def column(d, box, w, ink):
    x0, y0, x1, y1 = box
    d.rectangle(box, outline=ink, width=w)
    d.line((x0, y0, x1, y1), fill=ink, width=w)
    d.line((x0, y1, x1, y0), fill=ink, width=w)


SYMBOLS = [
    ("h_beam", h_beam, "H형강", "H형강의 단면을 나타내는 기호입니다. 위아래 플랜지와 가운데 웨브로 이루어진 강재입니다."),
    ("steel_pipe", steel_pipe, "강관", "원형 강관의 단면을 나타내는 기호입니다. 속이 빈 원형 강재입니다."),
    ("rebar", rebar, "이형철근", "이형철근의 단면을 나타내는 기호입니다. 표면의 마디가 콘크리트와의 부착을 높입니다."),
    ("concrete", concrete, "콘크리트", "콘크리트 단면을 나타내는 재료 표시입니다. 골재를 뜻하는 작은 삼각형을 그려 넣습니다."),
    ("brick", brick, "벽돌", "벽돌 쌓기를 나타내는 재료 표시입니다. 줄눈이 엇갈리게 그려집니다."),
    ("north_arrow", north_arrow, "방위표", "도면의 북쪽을 가리키는 방위표입니다. 화살표 끝이 북쪽입니다."),
    ("section_mark", section_mark, "단면 표시", "단면 표시 기호입니다. 이 위치에서 잘라 본 단면도가 따로 있다는 뜻입니다."),
    ("door", door, "여닫이문", "평면도의 여닫이문 기호입니다. 호는 문짝이 열리는 범위를 나타냅니다."),
    ("window", window, "창문", "평면도의 창문 기호입니다. 벽 사이의 평행선이 창틀과 유리를 나타냅니다."),
    ("stairs", stairs, "계단", "평면도의 계단 기호입니다. 화살표는 올라가는 방향을 나타냅니다."),
    ("warning_sign", warning_sign, "경고 표지", "안전 경고 표지입니다. 노란 삼각형은 위험 요소가 있으니 주의하라는 뜻입니다."),
    ("column", column, "기둥", "평면도의 기둥 표시입니다. 대각선을 그은 사각형이 기둥의 위치를 나타냅니다."),
]

# (margin, line width, ink, x shift): three training drawings and one held-out drawing per symbol
VARIANTS = [(14, 3, (30, 30, 30), 0), (22, 2, (20, 40, 120), -4), (10, 4, (90, 30, 30), 3)]
HELD_OUT = (18, 3, (40, 90, 40), 5)


def draw(symbol, variant) -> Image.Image:
    margin, width, ink, shift = variant
    image = Image.new("RGB", (SIZE, SIZE), (250, 250, 245))
    box = (margin + shift, margin, SIZE - margin + shift, SIZE - margin)
    symbol(ImageDraw.Draw(image), box, width, ink)
    return image


def row(name, image_name, question, term, answer) -> dict:
    return {"image": image_name, "instruction": question, "output": answer, "terms": [term]}


def main() -> None:
    train, held = [], []
    for name, symbol, term, answer in SYMBOLS:
        for k, variant in enumerate(VARIANTS):
            image_name = f"{name}_{k + 1}.png"
            draw(symbol, variant).save(FOLDER / image_name, optimize=True)
            train.append(row(name, image_name, QUESTIONS[k], term, answer))
        image_name = f"{name}_eval.png"
        draw(symbol, HELD_OUT).save(FOLDER / image_name, optimize=True)
        held.append(row(name, image_name, EVAL_QUESTION, term, answer))
    for file_name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (FOLDER / file_name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()

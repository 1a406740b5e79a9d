"""Draws the image prompts of the shipped general set (`../general.jsonl`): plain shapes, counts and colours that
any vision model should name, drawn here with PIL (nothing copied).

Run from the repository root: `python toolkit/assets/retention/images/draw.py`.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

FOLDER = Path(__file__).resolve().parent
SIZE = 96
RED, GREEN, BLUE, YELLOW, BLACK = (220, 30, 30), (30, 160, 60), (30, 70, 220), (240, 200, 20), (20, 20, 20)


def star(center, outer, inner):
    from math import cos, pi, sin

    cx, cy = center
    return [(cx + (outer if k % 2 == 0 else inner) * sin(k * pi / 5), cy - (outer if k % 2 == 0 else inner) *
             cos(k * pi / 5)) for k in range(10)]


DRAWINGS = {
    "red_circle.png": lambda d: d.ellipse((18, 18, 78, 78), fill=RED),
    "blue_circle.png": lambda d: d.ellipse((22, 22, 74, 74), fill=BLUE),
    "green_triangle.png": lambda d: d.polygon([(48, 14), (84, 80), (12, 80)], fill=GREEN),
    "blue_square.png": lambda d: d.rectangle((20, 20, 76, 76), fill=BLUE),
    "yellow_star.png": lambda d: d.polygon(star((48, 50), 38, 15), fill=YELLOW),
    "arrow_right.png": lambda d: (d.rectangle((12, 42, 60, 54), fill=BLACK),
                                  d.polygon([(60, 28), (86, 48), (60, 68)], fill=BLACK)),
    "two_circles.png": lambda d: (d.ellipse((8, 30, 42, 64), fill=RED), d.ellipse((54, 30, 88, 64), fill=RED)),
    "three_squares.png": lambda d: [d.rectangle((6 + 31 * i, 36, 28 + 31 * i, 58), fill=BLACK) for i in range(3)],
}


def main() -> None:
    for name, draw in DRAWINGS.items():
        image = Image.new("RGB", (SIZE, SIZE), "white")
        draw(ImageDraw.Draw(image))
        image.save(FOLDER / name, optimize=True)


if __name__ == "__main__":
    main()

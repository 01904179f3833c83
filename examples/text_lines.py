"""Text-line images rendered offline with the DejaVu fonts matplotlib ships: ground truth for free.

A line is a random string of lowercase letters and digits drawn with PIL on a fixed-size canvas,
lightly varied (font, size, position, ink contrast, noise) so a recognizer trained on it is not
brittle to one rendering. Pixels are float32 in [0, 1] with ink bright on a dark background,
shape (N, 1, LINE_HEIGHT, LINE_WIDTH). Everything is a pure function of a seed.

`write_lines_npz` stores `x` (the images) and `y` (the strings, fixed-width `<U16`, so numpy saves
them without pickle): the `--data` format of a single-input model with labels.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

__all__ = [
    "ALPHABET",
    "LINE_FONTS",
    "LINE_HEIGHT",
    "LINE_WIDTH",
    "LABEL_DTYPE",
    "font_path",
    "random_strings",
    "render_line",
    "render_lines",
    "write_lines_npz",
]

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# Sans, bold, monospace and serif faces: different stroke widths, advances and serifs.
LINE_FONTS: tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf")
LINE_HEIGHT = 32
LINE_WIDTH = 160
LABEL_DTYPE = "<U16"
MIN_CHARS, MAX_CHARS = 4, 12
_TEXT_HEIGHT = (20, 30)  # pixels from the font's ascender to its descender line
_MARGIN = 2


def font_path(name: str) -> Path:
    """Path of a font file bundled with matplotlib (mpl-data/fonts/ttf)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"matplotlib ships no font {name!r} (looked in {path.parent})")
    return path


@functools.lru_cache(maxsize=256)
def _font(name: str, size: int):  # noqa: ANN202 - PIL's FreeTypeFont
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path(name)), size)


def random_strings(n: int, rng: np.random.Generator, lo: int = MIN_CHARS, hi: int = MAX_CHARS) -> list[str]:
    """`n` strings of `lo`..`hi` characters drawn uniformly from ALPHABET."""
    lengths = rng.integers(lo, hi + 1, size=n)
    return ["".join(ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=int(k))) for k in lengths]


def render_line(text: str, rng: np.random.Generator, font: str | None = None) -> np.ndarray:
    """One line image, float32 (LINE_HEIGHT, LINE_WIDTH), ink ~1 on background ~0.

    The text box spans the font's full ascent + descent whatever the characters, so the relative
    height and position of glyphs (o vs 0, x vs k) survive; a line too long for the canvas is
    squeezed horizontally.
    """
    from PIL import Image, ImageDraw

    name = font if font is not None else LINE_FONTS[int(rng.integers(len(LINE_FONTS)))]
    target_h = int(rng.integers(_TEXT_HEIGHT[0], _TEXT_HEIGHT[1] + 1))
    probe = _font(name, 32)
    ascent, descent = probe.getmetrics()
    size = max(8, round(32 * target_h / (ascent + descent)))
    face = _font(name, size)
    ascent, descent = face.getmetrics()
    left, _, right, _ = face.getbbox(text)
    box = Image.new("L", (right - left + 2, ascent + descent), 0)
    ImageDraw.Draw(box).text((1 - left, 0), text, fill=255, font=face)
    max_w = LINE_WIDTH - 2 * _MARGIN
    h = min(box.height, LINE_HEIGHT)
    if box.width > max_w or box.height != h:
        box = box.resize((min(box.width, max_w), h), Image.Resampling.BILINEAR)
    canvas = np.zeros((LINE_HEIGHT, LINE_WIDTH), np.float32)
    top = int(rng.integers(0, LINE_HEIGHT - box.height + 1))
    x0 = int(rng.integers(_MARGIN, LINE_WIDTH - _MARGIN - box.width + 1))
    canvas[top : top + box.height, x0 : x0 + box.width] = np.asarray(box, np.float32) / 255.0
    ink, paper = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.2)
    img = paper + (ink - paper) * canvas + rng.normal(0.0, rng.uniform(0.0, 0.06), canvas.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def render_lines(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random lines: images float32 (n, 1, LINE_HEIGHT, LINE_WIDTH) and strings `<U16` (n,)."""
    rng = np.random.default_rng(seed)
    texts = random_strings(n, rng)
    x = np.empty((n, 1, LINE_HEIGHT, LINE_WIDTH), np.float32)
    for i, text in enumerate(texts):
        x[i, 0] = render_line(text, rng)
    return x, np.array(texts, dtype=LABEL_DTYPE)


def write_lines_npz(path: str | Path, n: int = 1000, seed: int = 1) -> Path:
    """Write `n` lines to an npz with `x` (images) and `y` (strings); readable with allow_pickle=False.

    The reference recognizer trains on seed 0 and picks its epoch on seed 2; seed 1 (the default)
    is the held-out set its reported character accuracy comes from.
    """
    x, y = render_lines(n, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, x=x, y=y)
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m examples.text_lines OUT.npz [--n N] [--seed S]`: write a lines npz."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m examples.text_lines", description=write_lines_npz.__doc__)
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(write_lines_npz(args.out, args.n, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Seeded synthetic visual-math data: the task the tiny end-to-end run learns.

Each item is one small image that shows up to four coloured numbers, one per row, one digit
glyph per ViT patch (64×64 image, 16×16 patches → a 4×4 grid of cells), plus a question about it:

* **perception** — read a number or a colour ("What is the second number?", "What colour is the
  first number?", "What is the red number?"). One look answers it; thinking does not help.
  Levels 1-4: digits of the number asked for (or how many numbers to tell apart by colour).
* **math** — arithmetic over the numbers shown ("Let A, B, C be the numbers from top to bottom.
  Compute A + B × C."), five levels on which the benefit of thinking rises step by step: one
  single-digit operation (1), one operation on two-digit numbers with carries (2), two single-digit
  operations (3), two operations on two-digit numbers (4), three operations (5).

Every item carries a programmatic trace (`reasoning`) that first describes the image, one line per
number with its place (A = top), value and colour, then works the question out: one line per
operation for math; for perception a fuller description (row and length too), the question
restated, and the line that picks the number or colour asked for::

    A = 37 red                      A = 37 red, first row, 2 digits
    B = 25 blue                     B = 4 green, second row, 1 digit
    C = 4 white                     asked: what is the second number
    37 + 25 = 50 + 12 = 62          second: B = 4
    62 - 4 = 60 - 2 = 58

A multi-digit + / - goes through its tens and units parts (`trace_style: split`, the default).
Measured on a text-only proxy of the tiny model (Qwen3 LM, hidden 128, 2 layers, 0.4M params;
1,000 math items, 1,500 steps of 64; greedy on 50 held-out items per level; levels as numbered
before levels 2 and 3 were added, so "L2 / L3" here are today's levels 4 / 5):

    accuracy           direct L1 / L2 / L3     forced trace L1 / L2 / L3
    plain  traces      0.94 / 0.24 / 0.06      0.96 / 0.42 / 0.24
    split  traces      0.98 / 0.12 / 0.02      0.98 / 0.92 / 0.74

With plain traces the first wrong line was always a two-digit + / - ("49 + 87 = 126"); reads
and products were never wrong. Multiplication only ever multiplies two single digits and
nothing goes negative. Curation decides which items train with their trace.

Splits `train`, `rl`, `eval` come from disjoint derived seeds, and every (image content,
question) pair is hashed into exactly one split, so no pair crosses splits (generate_all checks
it). The eval split is balanced over category × difficulty. Same config → byte-identical JSONL
and PNGs.

    from r4b_core.data.synthetic import generate_all
    paths = generate_all(cfg.data.synthetic, "runs/tiny/data", image_size=64, patch_size=16)
    # or: r4b data generate --config configs/tiny.yaml --out runs/tiny/data
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from r4b_core.config import SyntheticDataConfig
from r4b_core.data.schema import Record, write_jsonl
from r4b_core.errors import R4BError

SPLITS = ("train", "rl", "eval")
CATEGORIES = ("perception", "math")
SOURCE = "synthetic-visual-math"

# Share of the (image content, question) space owned by each split. A drawn item whose hash falls
# outside its split's range is redrawn, which makes the splits disjoint by construction.
_SPLIT_RANGES = {"train": (0.0, 0.6), "rl": (0.6, 0.8), "eval": (0.8, 1.0)}
_MAX_TRIES = 20_000

# A 5×7 bitmap font (one string per row, '#' = ink). Hand-drawn so every digit differs from every
# other in several pixels: a patch embedding separates them linearly.
FONT: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("####.", "....#", "....#", ".###.", "....#", "....#", "####."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
GLYPH_W, GLYPH_H = 5, 7

# Named colours, far apart in RGB; each number gets a small random shift of its shade.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 90, 250),
    "yellow": (235, 220, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 210, 220),
    "white": (235, 235, 235),
    "orange": (250, 140, 20),
}
COLOUR_JITTER = 16
ROWS = COLS = 4                       # the task layout: 4 numbers × 4 digits
LETTERS = "ABCD"                      # math variables, top to bottom
ORDINALS = ("first", "second", "third", "fourth")


class SyntheticDataError(R4BError, ValueError):
    """The generator cannot produce what was asked (sizes, split name, item space)."""


# ---------------------------------------------------------------------------------------------
# Layout and rendering
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where glyphs go: a 4×4 block of patch-sized cells, centred on the patch grid."""

    image_size: int
    patch_size: int
    scale: int          # font pixels per bitmap pixel
    origin: int         # top-left pixel of the 4×4 block (patch-aligned)

    @classmethod
    def for_sizes(cls, image_size: int, patch_size: int) -> Layout:
        if patch_size < 8 or image_size % patch_size or image_size // patch_size < ROWS:
            raise SyntheticDataError(
                f"model.tiny image_size={image_size}, patch_size={patch_size}: the synthetic task draws one "
                f"digit per patch in a {ROWS}×{COLS} grid, so it needs patch_size >= 8, image_size a multiple "
                f"of patch_size and image_size/patch_size >= {ROWS} (e.g. 64/16, 32/8, 128/16)")
        scale = max(1, min((patch_size - 2) // GLYPH_H, (patch_size - 2) // GLYPH_W))
        grid = image_size // patch_size
        return cls(image_size, patch_size, scale, ((grid - ROWS) // 2) * patch_size)

    def cell(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel (y, x) of a glyph cell."""
        return self.origin + row * self.patch_size, self.origin + col * self.patch_size

    def glyph_offset(self) -> tuple[int, int]:
        """(dy, dx) of the glyph inside its cell: centred."""
        return ((self.patch_size - GLYPH_H * self.scale) // 2, (self.patch_size - GLYPH_W * self.scale) // 2)


def glyph_mask(digit: str, scale: int) -> np.ndarray:
    """The bitmap of one digit as a bool array of shape (7·scale, 5·scale)."""
    rows = FONT[digit]
    base = np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)
    return np.kron(base, np.ones((scale, scale), dtype=bool))


def render(rows: Iterable[tuple[int, str, tuple[int, int, int]]], layout: Layout) -> np.ndarray:
    """Draw (number, colour name, rgb) rows, left-aligned, top to bottom, on black: uint8 HxWx3."""
    img = np.zeros((layout.image_size, layout.image_size, 3), dtype=np.uint8)
    dy, dx = layout.glyph_offset()
    masks = {d: glyph_mask(d, layout.scale) for d in FONT}
    for r, (number, _, rgb) in enumerate(rows):
        for c, ch in enumerate(str(number)):
            y, x = layout.cell(r, c)
            m = masks[ch]
            view = img[y + dy:y + dy + m.shape[0], x + dx:x + dx + m.shape[1]]
            view[m] = rgb
    return img


def _write_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr, "RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One generated question before it becomes a Record."""

    numbers: tuple[int, ...]          # top to bottom
    colours: tuple[str, ...]
    question: str
    answer: str
    answer_type: str
    category: str
    difficulty: int
    reasoning: str

    def key(self) -> str:
        """Identity of (image content, question); colour shade jitter is not content."""
        rows = ",".join(f"{n}:{c}" for n, c in zip(self.numbers, self.colours))
        return f"{rows}|{self.question}"


def _bucket(key: str) -> float:
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_of(key: str) -> str:
    """The split that owns an (image content, question) key."""
    u = _bucket(key)
    for name, (lo, hi) in _SPLIT_RANGES.items():
        if lo <= u < hi:
            return name
    return SPLITS[-1]


def _rand_number(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def _colours(rng: random.Random, k: int) -> tuple[str, ...]:
    return tuple(rng.sample(sorted(PALETTE), k))


def describe(numbers: tuple[int, ...], colours: tuple[str, ...]) -> list[str]:
    """The image described, one line per number, top to bottom: its place (A = top), value and
    colour ("A = 37 red"). Math traces start here: the values a careful solver notes first."""
    return [f"{LETTERS[i]} = {n} {c}" for i, (n, c) in enumerate(zip(numbers, colours))]


def describe_in_full(numbers: tuple[int, ...], colours: tuple[str, ...]) -> list[str]:
    """The image described as a careful reader does before answering a question about it: each
    number with its colour, row and length ("A = 37 red, first row, 2 digits"). Perception traces
    start here; they are long where the answer takes one look, as R-4B's forced thinking on OCRBench
    is (394 tokens where auto mode spends 66)."""
    return [f"{line}, {ORDINALS[i]} row, {len(str(n))} digit{'s' if len(str(n)) > 1 else ''}"
            for i, (line, n) in enumerate(zip(describe(numbers, colours), numbers))]


# --- perception ------------------------------------------------------------------------------
# Difficulty = how much there is to read: digits of the number asked for (1-4), or for colour
# questions how many numbers the image holds (2, 3, 4, 4). Thinking describes the whole image,
# then points at the number or colour asked for; one look answers without it.
PERCEPTION_LEVELS = (1, 2, 3, 4)


def _perception(rng: random.Random, level: int) -> Item:
    kind = rng.choices(("read", "colour_of", "read_by_colour"), weights=(2, 1, 1))[0]
    if kind == "colour_of":
        count = {1: 2, 2: 3, 3: 4, 4: 4}[level]
        numbers = tuple(_rand_number(rng, rng.randint(1, 4)) for _ in range(count))
    else:
        count = rng.randint(1 if kind == "read" else 2, ROWS)
        numbers = [_rand_number(rng, rng.randint(1, 4)) for _ in range(count)]
    colours = _colours(rng, count)
    target = rng.randrange(count)
    if kind != "colour_of":
        numbers[target] = _rand_number(rng, level)
        numbers = tuple(numbers)
    var = LETTERS[target]
    if kind == "read":
        q = f"What is the {ORDINALS[target]} number?"
        answer, atype, pick = str(numbers[target]), "integer", f"{ORDINALS[target]}: {var} = {numbers[target]}"
    elif kind == "colour_of":
        q = f"What colour is the {ORDINALS[target]} number?"
        answer, atype, pick = colours[target], "text", f"{ORDINALS[target]}: {var} is {colours[target]}"
    else:
        q = f"What is the {colours[target]} number?"
        answer, atype, pick = str(numbers[target]), "integer", f"{colours[target]}: {var} = {numbers[target]}"
    asked = "asked: " + q[0].lower() + q[1:].rstrip("?")
    return Item(numbers, colours, q, answer, atype, "perception", level,
                "\n".join(describe_in_full(numbers, colours) + [asked, pick]))


# --- math ------------------------------------------------------------------------------------
# Templates per level: an expression over A..D (standard precedence) and each variable's range.
# The benefit of thinking rises level by level: one single-digit operation (1), one operation on
# two-digit numbers with carries (2), two single-digit operations (3), two operations on two-digit
# numbers (4), three operations (5). Products are always single digit × single digit.
_D1, _D2 = (0, 9), (10, 99)
MATH_TEMPLATES: dict[int, tuple[tuple[str, tuple[tuple[int, int], ...]], ...]] = {
    1: (
        ("A + B", (_D1, _D1)),
        ("A - B", (_D1, _D1)),
        ("A × B", (_D1, _D1)),
    ),
    2: (
        ("A + B", (_D2, _D2)),
        ("A - B", (_D2, _D2)),
        ("A + B", (_D2, _D1)),
        ("A - B", (_D2, _D1)),
    ),
    3: (
        ("A + B + C", (_D1, _D1, _D1)),
        ("A × B + C", (_D1, _D1, _D1)),
        ("A + B × C", (_D1, _D1, _D1)),
        ("A × B - C", (_D1, _D1, _D1)),
        ("A - B + C", (_D1, _D1, _D1)),
    ),
    4: (
        ("A + B + C", (_D2, _D1, _D2)),
        ("A + B × C", (_D2, _D1, _D1)),
        ("A × B + C", (_D1, _D1, _D2)),
        ("A × B - C", (_D1, _D1, _D1)),
        ("A + B - C", (_D2, _D2, _D2)),
    ),
    5: (
        ("A + B + C + D", (_D2, _D2, _D2, _D2)),
        ("A × B + C × D", (_D1, _D1, _D1, _D1)),
        ("A × B + C - D", (_D1, _D1, _D2, _D2)),
        ("A + B - C + D", (_D2, _D2, _D2, _D2)),
        ("A × B - C × D", (_D1, _D1, _D1, _D1)),
        ("A + B × C - D", (_D2, _D1, _D1, _D2)),
    ),
}
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def step_line(a: int, op: str, b: int, style: str = "split") -> str:
    """One trace line for `a op b`. "split" writes a multi-digit + / - through its tens and units
    parts, each a single-digit operation: 37 + 25 = 50 + 12 = 62, 42 - 15 = 30 - 3 = 27."""
    r = _OPS[op](a, b)
    if style == "plain" or op == "×" or max(a, b) < 10:
        return f"{a} {op} {b} = {r}"
    tens = _OPS[op](a // 10, b // 10) * 10
    units = _OPS[op](a % 10, b % 10)
    sign = "-" if units < 0 else "+"
    return f"{a} {op} {b} = {tens} {sign} {abs(units)} = {r}"


def evaluate_steps(expr: str, values: dict[str, int], style: str = "split") -> tuple[int, list[str]]:
    """Evaluate `expr` (variables A–D, + - ×, standard precedence, left to right) and return the
    result with one trace line per operation, in the order a person would work it out."""
    tokens = expr.split()
    pos = 0
    steps: list[str] = []

    def apply(op: str, a: int, b: int) -> int:
        steps.append(step_line(a, op, b, style))
        return _OPS[op](a, b)

    def term() -> int:
        nonlocal pos
        v = values[tokens[pos]]
        pos += 1
        while pos < len(tokens) and tokens[pos] == "×":
            v = apply("×", v, values[tokens[pos + 1]])
            pos += 2
        return v

    v = term()
    while pos < len(tokens):
        op = tokens[pos]
        pos += 1
        v = apply(op, v, term())
    return v, steps


def _math(rng: random.Random, level: int, style: str) -> Item:
    expr, ranges = rng.choice(MATH_TEMPLATES[level])
    while True:   # keep every intermediate result non-negative (a few redraws at most)
        numbers = tuple(rng.randint(lo, hi) for lo, hi in ranges)
        values = dict(zip(LETTERS, numbers))
        result, steps = evaluate_steps(expr, values, style)
        if all(int(s.rsplit("= ", 1)[1]) >= 0 for s in steps):
            break
    names = ", ".join(LETTERS[: len(numbers)])
    question = f"Let {names} be the numbers from top to bottom. Compute {expr}."
    colours = _colours(rng, len(numbers))
    return Item(numbers, colours, question, str(result), "integer", "math", level,
                "\n".join(describe(numbers, colours) + steps))


def levels_of(category: str, difficulties: Iterable[int]) -> list[int]:
    """The configured levels that `category` has (perception stops at 4, math at 5)."""
    have = PERCEPTION_LEVELS if category == "perception" else MATH_TEMPLATES
    return sorted(d for d in set(difficulties) if d in have)


def draw_item(rng: random.Random, category: str, level: int, style: str = "split") -> Item:
    return _math(rng, level, style) if category == "math" else _perception(rng, level)


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------
def split_seed(seed: int, name: str) -> str:
    """The derived seed of a split (a string: random.Random hashes it with SHA-512)."""
    return f"r4b-synthetic/{seed}/{name}"


def _cells(cfg: SyntheticDataConfig) -> list[tuple[str, int]]:
    cats = [c for c in CATEGORIES if (c == "math" and cfg.math_fraction > 0) or
            (c == "perception" and cfg.math_fraction < 1)]
    return [(c, d) for c in cats for d in levels_of(c, cfg.difficulties)]


def _check(name: str, cfg: SyntheticDataConfig) -> None:
    if name not in SPLITS:
        raise SyntheticDataError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
    bad = [d for d in cfg.difficulties if d not in MATH_TEMPLATES]
    if bad or not cfg.difficulties:
        raise SyntheticDataError(f"data.synthetic.difficulties={cfg.difficulties}: allowed levels are "
                                 f"{sorted(MATH_TEMPLATES)} (a non-empty subset; perception has levels "
                                 f"{PERCEPTION_LEVELS[0]}-{PERCEPTION_LEVELS[-1]} of them)")
    if _math_fraction(name, cfg) < 1 and not levels_of("perception", cfg.difficulties):
        raise SyntheticDataError(f"data.synthetic.difficulties={cfg.difficulties} has no perception level "
                                 f"(those are {list(PERCEPTION_LEVELS)}); add one or set math_fraction: 1 "
                                 f"(and rl_math_fraction: 1 or empty)")


def _math_fraction(name: str, cfg: SyntheticDataConfig) -> float:
    return cfg.rl_math_fraction if name == "rl" and cfg.rl_math_fraction is not None else cfg.math_fraction


def draw_split(name: str, n: int, cfg: SyntheticDataConfig) -> list[Item]:
    """The items of one split, without images: deterministic in (cfg.seed, name, n)."""
    _check(name, cfg)
    rng = random.Random(split_seed(cfg.seed, name))
    cells = _cells(cfg)
    seen: set[str] = set()
    items: list[Item] = []
    for i in range(n):
        if name == "eval":
            category, level = cells[i % len(cells)]      # balanced: round-robin over the cells
        else:
            category = "math" if rng.random() < _math_fraction(name, cfg) else "perception"
            level = rng.choice(levels_of(category, cfg.difficulties))
        for _ in range(_MAX_TRIES):
            item = draw_item(rng, category, level, cfg.trace_style)
            key = item.key()
            if key not in seen and split_of(key) == name:
                break
        else:
            raise SyntheticDataError(
                f"split {name}: found no new {category} item of difficulty {level} after {_MAX_TRIES} draws "
                f"(item {i} of {n}); the item space is exhausted: lower data.synthetic.{name}_size")
        seen.add(key)
        items.append(item)
    return items


def _record(name: str, i: int, item: Item) -> Record:
    return Record(id=f"{name}-{i:05d}", images=[f"images/{name}-{i:05d}.png"], question=item.question,
                  answer=item.answer, answer_type=item.answer_type, category=item.category,
                  difficulty=item.difficulty, source=SOURCE, objective=True, reasoning=item.reasoning)


def _generate(name: str, n: int, cfg: SyntheticDataConfig, out_dir: str | Path, image_size: int,
              patch_size: int) -> tuple[Path, list[Item]]:
    layout = Layout.for_sizes(image_size, patch_size)
    items = draw_split(name, n, cfg)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # Shades come from their own stream so they never change which items are drawn.
    shade = random.Random(split_seed(cfg.seed, name) + "/shade")
    records = []
    for i, item in enumerate(items):
        rows = []
        for number, colour in zip(item.numbers, item.colours):
            rgb = tuple(min(255, max(0, v + shade.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in PALETTE[colour])
            rows.append((number, colour, rgb))
        rec = _record(name, i, item)
        _write_png(render(rows, layout), out / rec.images[0])
        records.append(rec)
    path = out / f"{name}.jsonl"
    write_jsonl(path, records)     # last, atomically: a JSONL on disk means its images are there
    return path, items


def generate_split(name: str, n: int, cfg: SyntheticDataConfig, out_dir: str | Path, image_size: int = 64,
                   patch_size: int = 16) -> Path:
    """Write `<out_dir>/<name>.jsonl` and its PNGs under `<out_dir>/images/`; return the JSONL path."""
    return _generate(name, n, cfg, out_dir, image_size, patch_size)[0]


def generate_all(cfg: SyntheticDataConfig, out_dir: str | Path, image_size: int = 64,
                 patch_size: int = 16) -> dict[str, Path]:
    """All three splits (sizes from cfg); checks that no (image content, question) crosses splits."""
    sizes = {"train": cfg.train_size, "rl": cfg.rl_size, "eval": cfg.eval_size}
    paths: dict[str, Path] = {}
    owner: dict[str, str] = {}
    for name in SPLITS:
        paths[name], items = _generate(name, sizes[name], cfg, out_dir, image_size, patch_size)
        for item in items:
            other = owner.setdefault(item.key(), name)
            if other != name:
                raise SyntheticDataError(f"item {item.key()!r} is in both {other} and {name}; this is a bug")
    return paths


def tokenizer_corpus(records: Iterable[Record | dict[str, Any]]) -> Iterator[str]:
    """The texts a tokenizer for this task must cover: questions, answers, traces."""
    for r in records:
        get = r.get if isinstance(r, dict) else (lambda k, _r=r: getattr(_r, k))
        yield get("question")
        yield get("answer")
        if get("reasoning"):
            yield get("reasoning")

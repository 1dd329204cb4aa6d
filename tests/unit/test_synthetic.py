"""The synthetic visual-math generator, checked from the outside: every answer is recomputed from
the pixels of its PNG (glyphs decoded back to digits, inks to palette colours)."""

import hashlib
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r4b_core import cli
from r4b_core.config import SyntheticDataConfig
from r4b_core.data import synthetic as syn
from r4b_core.data.images import load_image
from r4b_core.data.schema import DataError, read_jsonl

SMALL = SyntheticDataConfig(train_size=150, rl_size=60, eval_size=60, seed=3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, syn.generate_all(SMALL, out)


# --- an independent reader of the images ----------------------------------------------------
def decode(img: Image.Image, patch: int = 16) -> list[tuple[int, str]]:
    """(number, colour) rows, top to bottom, read from pixels: each cell's ink pattern is
    matched against the 5x7 font, its mean colour against the palette."""
    a = np.asarray(img.convert("RGB")).astype(int)
    grid = a.shape[0] // patch
    origin = (grid - 4) // 2 * patch
    glyphs = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in syn.FONT.items()}
    rows = []
    for r in range(4):
        digits, inks = "", []
        for c in range(4):
            y, x = origin + r * patch, origin + c * patch
            cell = a[y:y + patch, x:x + patch]
            ink = cell.max(axis=2) > 60
            if not ink.any():
                break
            ys, xs = np.nonzero(ink)
            box = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            scale = (ys.max() - ys.min() + 1) // 7
            small = box[::scale, ::scale]
            # (glyphs without ink in an outer column, like "1", have a narrower box: trim them too)
            matches = [d for d, g in glyphs.items() if np.array_equal(g[:, g.any(axis=0)], small)]
            assert len(matches) == 1, f"cell ({r},{c}) matches {matches}"
            digits += matches[0]
            inks.append(cell[ink].mean(axis=0))
        if not digits:
            break
        rgb = np.mean(inks, axis=0)
        colour = min(syn.PALETTE, key=lambda k: float(((np.array(syn.PALETTE[k]) - rgb) ** 2).sum()))
        assert ((np.array(syn.PALETTE[colour]) - rgb) ** 2).sum() ** 0.5 < 40, "ink far from every palette colour"
        rows.append((int(digits), colour))
    return rows


ORD = {"first": 0, "second": 1, "third": 2, "fourth": 3}


def expected_answer(question: str, rows: list[tuple[int, str]]) -> str:
    """The answer a reader of the image would give, from the question text alone."""
    if m := re.fullmatch(r"What is the (\w+) number\?", question):
        key = m.group(1)
        if key in ORD:
            return str(rows[ORD[key]][0])
        (number,) = [n for n, c in rows if c == key]
        return str(number)
    if m := re.fullmatch(r"What colour is the (\w+) number\?", question):
        return rows[ORD[m.group(1)]][1]
    m = re.fullmatch(r"Let ([A-D](?:, [A-D])*) be the numbers from top to bottom\. Compute (.+)\.", question)
    assert m, question
    names = m.group(1).split(", ")
    assert len(names) == len(rows), "one number per variable"
    expr = m.group(2).replace("×", "*")
    for name, (n, _) in zip(names, rows):
        expr = expr.replace(name, str(n))
    assert re.fullmatch(r"[\d +*-]+", expr), expr
    return str(eval(expr))  # noqa: S307 - digits and + - * only

def _records(paths):
    return {name: read_jsonl(p).records for name, p in paths.items()}


# --- tests -------------------------------------------------------------------------------------
def test_answers_follow_from_the_pixels(small):
    out, paths = small
    n = 0
    for name, recs in _records(paths).items():
        for r in recs:
            img = load_image(r.images[0], jsonl_path=paths[name])
            assert img.size == (64, 64) and img.mode == "RGB"
            rows = decode(img)
            assert r.answer == expected_answer(r.question, rows), (r.id, r.question, rows)
            n += 1
    assert n == 270


def test_traces_are_correct_steps_ending_with_the_answer(small):
    _, paths = small
    for recs in _records(paths).values():
        for r in recs:
            lines = r.reasoning.splitlines()
            assert lines[-1].endswith(r.answer)
            for line in lines:
                if m := re.fullmatch(r"(\d+) ([-+×]) (\d+) = (?:(\d+) ([-+]) (\d+) = )?(\d+)", line):
                    a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[7])
                    calc = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "×": lambda x, y: x * y}
                    assert calc[op](a, b) == c, line
                    if op == "×":
                        assert a < 10 and b < 10, "products stay single digit × single digit"
                    if m[4] is not None:    # split: tens part and units part, each one digit op
                        tens, units = int(m[4]), int(m[6]) * (1 if m[5] == "+" else -1)
                        assert op != "×" and max(a, b) >= 10, line
                        assert tens == calc[op](a // 10, b // 10) * 10 and units == calc[op](a % 10, b % 10), line
                        assert tens + units == c, line
                    else:
                        assert op == "×" or max(a, b) < 10, f"multi-digit step not split: {line}"
                else:
                    assert re.fullmatch(r"[A-D] = \d+ [a-z]+(, [a-z]+ row, \d digits?)?|\w+: [A-D] (=|is) \w+"
                                        r"|asked: what .+", line), line
            # the description: every number of the image, top to bottom, with its colour (perception:
            # and its row and length)
            n = len(r.reasoning.splitlines()) - (2 if r.category == "perception" else _ops(r.reasoning))
            full = r", [a-z]+ row, \d digits?" if r.category == "perception" else ""
            assert all(re.fullmatch(r"[A-D] = \d+ [a-z]+" + full, ln) for ln in lines[:n])
            assert [ln[0] for ln in lines[:n]] == list("ABCD")[:n]


def _ops(trace: str) -> int:
    """Operation lines ("a op b = r", or split: "a op b = tens ± units = r")."""
    return sum(bool(re.fullmatch(r"\d+ [-+×] \d+ = (\d+ [-+] \d+ = )?\d+", ln)) for ln in trace.splitlines())


def test_difficulty_scales_steps_and_sizes():
    items = syn.draw_split("train", 5000, SyntheticDataConfig(math_fraction=1.0, difficulties=[1, 2, 3, 4, 5]))
    by_level: dict[int, list] = {k: [] for k in range(1, 6)}
    for it in items:
        by_level[it.difficulty].append(it)
    ops = {1: 1, 2: 1, 3: 2, 4: 2, 5: 3}
    for level, its in by_level.items():
        assert its and all(_ops(it.reasoning) == ops[level] for it in its)
        assert all(len(it.numbers) == ops[level] + 1 for it in its)
    mean_answer = {k: round(float(np.mean([int(i.answer) for i in v])), 1) for k, v in by_level.items()}
    max_digits = {k: max(len(str(n)) for i in v for n in i.numbers) for k, v in by_level.items()}
    assert max_digits == {1: 1, 2: 2, 3: 1, 4: 2, 5: 2}
    # level 2 is one operation on two-digit numbers: its + / - lines are split (tens and units)
    assert all(re.search(r"= \d+ [-+] \d+ =", i.reasoning) for i in by_level[2])
    # trace length in tokens of the tiny tokenizer (digits split), trained on this corpus
    from r4b_core.models.tokenizer import train_tokenizer

    tok = train_tokenizer(syn.tokenizer_corpus([i.__dict__ for i in items[:2000]]), 512)
    lengths = {k: [len(tok(i.reasoning, add_special_tokens=False).input_ids) for i in v] for k, v in by_level.items()}
    mean_len = {k: round(float(np.mean(v)), 1) for k, v in lengths.items()}
    max_len = {k: max(v) for k, v in lengths.items()}
    print(f"mean answer by level {mean_answer}, max operand digits {max_digits}, "
          f"trace tokens mean {mean_len} max {max_len}")
    assert mean_len[1] < mean_len[2] < mean_len[3] < mean_len[4] < mean_len[5] <= 80 and max_len[5] <= 96
    # all answers are integers >= 0; no division anywhere
    assert all(int(i.answer) >= 0 for i in items) and not any("/" in i.question for i in items)


def test_plain_trace_style_draws_the_same_items():
    split = syn.draw_split("rl", 300, SyntheticDataConfig(seed=5))
    plain = syn.draw_split("rl", 300, SyntheticDataConfig(seed=5, trace_style="plain"))
    assert [i.key() for i in split] == [i.key() for i in plain]
    assert [i.answer for i in split] == [i.answer for i in plain]
    assert "37 + 25 = 62" == syn.step_line(37, "+", 25, "plain")
    assert "37 + 25 = 50 + 12 = 62" == syn.step_line(37, "+", 25, "split")
    assert "42 - 15 = 30 - 3 = 27" == syn.step_line(42, "-", 15)
    assert "102 - 61 = 40 + 1 = 41" == syn.step_line(102, "-", 61)
    assert "7 × 8 = 56" == syn.step_line(7, "×", 8) and "3 + 5 = 8" == syn.step_line(3, "+", 5)
    changed = [(a.reasoning, b.reasoning) for a, b in zip(split, plain) if a.reasoning != b.reasoning]
    assert changed and all(len(a) > len(b) for a, b in changed)


def test_perception_trace_describes_colour_row_and_length():
    assert syn.describe_in_full((37, 4), ("red", "green")) == [
        "A = 37 red, first row, 2 digits", "B = 4 green, second row, 1 digit"]


def test_perception_difficulty_is_how_much_to_read():
    items = syn.draw_split("train", 3000, SyntheticDataConfig(math_fraction=0.0, difficulties=[1, 2, 3, 4, 5]))
    assert {it.difficulty for it in items} == {1, 2, 3, 4}           # perception stops at level 4
    for it in items:
        lines = it.reasoning.splitlines()
        assert _ops(it.reasoning) == 0 and len(lines) == len(it.numbers) + 2   # description, question, pick
        assert lines[:-2] == syn.describe_in_full(it.numbers, it.colours)
        assert lines[-2] == "asked: " + it.question[0].lower() + it.question[1:-1]
        assert lines[-1].endswith(f"= {it.answer}" if it.answer_type == "integer" else f"is {it.answer}")
        if it.answer_type == "integer":
            assert len(it.answer) == it.difficulty
        else:
            assert it.answer in syn.PALETTE and len(it.numbers) == min(it.difficulty + 1, 4)


def test_deterministic_bytes(tmp_path, small):
    out1, _ = small
    out2 = tmp_path / "again"
    syn.generate_all(SMALL, out2)

    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    d1, d2 = digest(out1), digest(out2)
    assert len(d1) == 270 + 3 and d1 == d2
    other = syn.draw_split("train", 150, SyntheticDataConfig(train_size=150, seed=4))
    assert [i.key() for i in other] != [i.key() for i in syn.draw_split("train", 150, SMALL)]


def test_splits_are_disjoint_from_the_pixels(small):
    _, paths = small
    seen: dict[tuple, str] = {}
    for name, recs in _records(paths).items():
        for r in recs:
            key = (tuple(decode(load_image(r.images[0], paths[name]))), r.question)
            assert seen.setdefault(key, name) == name, f"{key} in {seen[key]} and {name}"
    # derived seeds differ per split and the hash ownership is exclusive
    assert len({syn.split_seed(3, s) for s in syn.SPLITS}) == 3
    assert all(syn.split_of(k) == "eval" for k in (i.key() for i in syn.draw_split("eval", 50, SMALL)))


@pytest.mark.parametrize("eval_size", [60, 61, 65])
def test_eval_is_balanced(eval_size):
    items = syn.draw_split("eval", eval_size, SyntheticDataConfig(eval_size=eval_size, math_fraction=0.2))
    counts = Counter((i.category, i.difficulty) for i in items)
    assert len(counts) == 6 and sum(counts.values()) == eval_size
    assert max(counts.values()) - min(counts.values()) <= 1


def test_rl_split_has_its_own_math_share():
    cfg = SyntheticDataConfig(math_fraction=0.5, rl_math_fraction=1.0)
    assert {i.category for i in syn.draw_split("rl", 60, cfg)} == {"math"}
    assert Counter(i.category for i in syn.draw_split("train", 200, cfg))["perception"] > 60
    assert syn.draw_split("eval", 16, cfg) == syn.draw_split("eval", 16, SyntheticDataConfig(math_fraction=0.5))
    assert syn.draw_split("rl", 30, SyntheticDataConfig(math_fraction=0.3, rl_math_fraction=None)) \
        == syn.draw_split("rl", 30, SyntheticDataConfig(math_fraction=0.3))
    with pytest.raises(syn.SyntheticDataError, match=r"no perception level .*rl_math_fraction"):
        syn.draw_split("rl", 5, SyntheticDataConfig(difficulties=[5], math_fraction=1, rl_math_fraction=0.5))


def test_jsonl_validates_and_pngs_are_64px(small):
    out, paths = small
    for name, p in paths.items():
        recs = read_jsonl(p).records          # raises DataError on any invalid line
        assert recs and all(r.source == syn.SOURCE and r.objective and r.reasoning for r in recs)
        assert len({r.id for r in recs}) == len(recs)
        for r in recs:
            raw = (out / r.images[0]).read_bytes()
            assert raw[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(out / r.images[0]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    assert {p.name for p in paths.values()} == {"train.jsonl", "rl.jsonl", "eval.jsonl"}
    assert not list(out.rglob("*.tmp"))


def test_other_image_sizes_scale_the_layout(tmp_path):
    cfg = SyntheticDataConfig(eval_size=12, seed=1)
    for size, patch in ((32, 8), (128, 16), (128, 32)):
        path = syn.generate_split("eval", 12, cfg, tmp_path / f"{size}-{patch}", image_size=size, patch_size=patch)
        for r in read_jsonl(path).records:
            img = load_image(r.images[0], path)
            assert img.size == (size, size)
            assert r.answer == expected_answer(r.question, decode(img, patch))


@pytest.mark.parametrize("size,patch", [(64, 4), (64, 32), (60, 16), (16, 16)])
def test_unsupported_sizes_are_rejected(tmp_path, size, patch):
    with pytest.raises(syn.SyntheticDataError, match=f"image_size={size}, patch_size={patch}.*needs patch_size >= 8"):
        syn.generate_split("train", 5, SMALL, tmp_path, image_size=size, patch_size=patch)


def test_bad_split_and_levels(tmp_path):
    with pytest.raises(syn.SyntheticDataError, match="unknown split 'test'; allowed: train, rl, eval"):
        syn.generate_split("test", 5, SMALL, tmp_path)
    with pytest.raises(syn.SyntheticDataError, match=r"difficulties=\[1, 6\]: allowed levels are \[1, 2, 3, 4, 5\]"):
        syn.draw_split("train", 5, SyntheticDataConfig(difficulties=[1, 6]))
    with pytest.raises(syn.SyntheticDataError, match=r"difficulties=\[5\] has no perception level"):
        syn.draw_split("train", 5, SyntheticDataConfig(difficulties=[5]))
    assert {i.category for i in syn.draw_split("train", 20, SyntheticDataConfig(difficulties=[5], math_fraction=1))} \
        == {"math"}


def test_default_sizes_are_fast(tmp_path):
    cfg = SyntheticDataConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    paths = syn.generate_all(cfg, tmp_path)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(read_jsonl(p).records) for p in paths.values())
    print(f"generated {n} items in {wall:.2f} s wall / {cpu:.2f} s CPU")
    assert n == 2496 and cpu < 15


def test_tokenizer_corpus(small):
    _, paths = small
    recs = read_jsonl(paths["rl"]).records
    texts = list(syn.tokenizer_corpus(recs))
    assert len(texts) == 3 * len(recs)
    assert set(texts) >= {r.question for r in recs} | {r.answer for r in recs} | {r.reasoning for r in recs}
    as_dicts = list(syn.tokenizer_corpus([r.model_dump() for r in recs]))
    assert as_dicts == texts


# --- images.py -------------------------------------------------------------------------------
def test_load_image_paths_and_errors(small, tmp_path):
    out, paths = small
    rec = read_jsonl(paths["train"]).records[0]
    rel = load_image(rec.images[0], jsonl_path=paths["train"])
    absolute = load_image(str(out / rec.images[0]))
    uri = load_image("file://" + str(out / rec.images[0]))
    uri_jsonl = load_image(rec.images[0], jsonl_path="file://" + str(paths["train"]))
    assert rel.tobytes() == absolute.tobytes() == uri.tobytes() == uri_jsonl.tobytes()
    with pytest.raises(DataError, match=r"train.jsonl: image 'images/nope.png' not found \(looked at .*images/nope.png\)"):
        load_image("images/nope.png", jsonl_path=paths["train"])
    with pytest.raises(DataError, match="pass jsonl_path"):
        load_image("images/nope.png")
    bad = tmp_path / "images" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"d.jsonl: image 'images/bad.png' .* is not a readable image"):
        load_image("images/bad.png", jsonl_path=tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"needs a storage.Store"):
        load_image("images/x.png", jsonl_path="s3://bucket/run/data/train.jsonl")


def test_load_image_through_a_store(small, tmp_path):
    # With a Store every read goes through Store.read_bytes, the call that serves s3:// URIs
    # (exercised against SeaweedFS in tests/integration/test_storage.py); here it reads files.
    from r4b_core.storage import Store

    out, paths = small
    store = Store()
    rec = read_jsonl(paths["eval"]).records[0]
    want = Image.open(out / rec.images[0]).convert("RGB").tobytes()
    for jsonl in (paths["eval"], "file://" + str(paths["eval"])):
        assert load_image(rec.images[0], jsonl_path=jsonl, store=store).tobytes() == want
    with pytest.raises(DataError, match=r"eval.jsonl: image 'images/gone.png': cannot read .*images/gone.png"):
        load_image("images/gone.png", jsonl_path=paths["eval"], store=store)


# --- CLI ---------------------------------------------------------------------------------------
def test_cli_data_generate(tmp_path, capsys, repo_root):
    rc = cli.main(["data", "generate", "--config", str(repo_root / "configs/tiny.yaml"), "--out", str(tmp_path),
                   "--set", "data.synthetic.train_size=40", "--set", "data.synthetic.rl_size=10",
                   "--set", "data.synthetic.eval_size=12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"eval\s+math\s+3\s+2\b", out) and re.search(r"train\s+total\s+40\b", out)
    assert len(read_jsonl(tmp_path / "eval.jsonl").records) == 12
    rc = cli.main(["data", "generate", "--config", str(repo_root / "configs/tiny.yaml"), "--out", str(tmp_path),
                   "--set", "model.tiny.patch_size=32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "patch_size=32" in err

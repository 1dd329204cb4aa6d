import json

import pytest

from r4b_core.data.schema import DataError, Record, parse_jsonl, read_jsonl, write_jsonl


def _line(**kw):
    base = {"id": "a", "question": "What colour?", "answer": "red"}
    base.update(kw)
    return json.dumps(base)


def test_roundtrip(tmp_path):
    recs = [Record(id="1", question="q", answer="4", images=["img/1.png"], reasoning="2+2=4", label="reasoning")]
    p = tmp_path / "d.jsonl"
    assert write_jsonl(p, recs) == 1
    back = read_jsonl(p).records
    assert back == recs
    assert back[0].sft_target() == "<think>\n2+2=4\n</think>\n\n4"
    assert Record(id="2", question="q", answer="4").sft_target() == "<think>\n\n</think>\n\n4"


@pytest.mark.parametrize("line,expect", [
    ("{not json", "d.jsonl:2: (line): not valid JSON"),
    (_line(answer="  "), "d.jsonl:2: answer: answer is empty"),
    (_line(difficulty=99), "d.jsonl:2: difficulty: Input should be less than or equal to 10 (got 99)"),
    (_line(colour="red"), "d.jsonl:2: colour: unknown field; allowed: id,"),
    (json.dumps({"id": "b", "answer": "1"}), "d.jsonl:2: question: missing required field"),
    (_line(), "d.jsonl:2: id: duplicate id 'a' (first on line 1)"),
    ("[1, 2]", "d.jsonl:2: (line): expected a JSON object, got list"),
])
def test_bad_lines_name_file_line_field(tmp_path, line, expect):
    p = tmp_path / "d.jsonl"
    p.write_text(_line() + "\n" + line + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(p)
    assert expect.split("d.jsonl", 1)[1] in str(info.value)
    collected = read_jsonl(p, on_error="collect")
    assert len(collected.records) == 1 and len(collected.bad) == 1 and collected.bad[0].line == 2


def test_blank_lines_skipped():
    res = parse_jsonl("\n" + _line() + "\n   \n")
    assert [r.id for r in res.records] == ["a"]


def test_cli_data_check_reports_every_bad_line(tmp_path, capsys):
    from r4b_core.cli import main

    p = tmp_path / "d.jsonl"
    p.write_text(_line() + "\n" + _line(id="b", answer=" ") + "\n{oops\n")
    assert main(["data", "check", str(p)]) == 2
    out = capsys.readouterr()
    assert f"{p}:2: answer: answer is empty" in out.err
    assert f"{p}:3: (line): not valid JSON" in out.err
    assert "1 valid records, 2 bad lines" in out.out
    p.write_text(_line() + "\n")
    assert main(["data", "check", str(p)]) == 0


def test_not_utf8_is_one_line_with_file_line_byte(tmp_path, capsys):
    from r4b_core.cli import main
    from r4b_core.storage import Store, StorageError

    p = tmp_path / "d.jsonl"
    second = '{"id": "b", "question": "caf\xe9?", "answer": "1"}'
    p.write_bytes(_line().encode() + b"\n" + second.encode("latin-1") + b"\n")
    offset = len(_line()) + 1 + second.index("\xe9")
    with pytest.raises(DataError) as info:
        read_jsonl(p)
    assert str(info.value).startswith(f"{p}:2: not UTF-8 at byte {offset} (0xe9, column ")
    with pytest.raises(StorageError, match=rf"^{p}:2: not UTF-8 at byte {offset} "):
        Store().read_text(str(p))          # what curate, eval and prepare read raw data with
    assert main(["data", "check", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}:2: not UTF-8 at byte {offset}") and err.count("\n") == 1


def test_line_numbers_split_on_newline_only(tmp_path):
    """U+2028 (which write_jsonl emits raw) and a stray \\r inside a line keep their line's number."""
    from r4b_core.curate import read_raw
    from r4b_core.evaluate import EvalError, load_benchmark

    first = Record(id="a", question="line one\u2028line two", answer="1")
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [first])
    assert "\u2028" in p.read_text(encoding="utf-8")
    text = p.read_text(encoding="utf-8") + '{"id": "b", "question": "x\ry", "answer": "2"}\n{oops\n'
    p.write_bytes(text.encode())
    bad = read_jsonl(p, on_error="collect").bad
    assert [(b.line, b.field) for b in bad] == [(2, "(line)"), (3, "(line)")]
    assert "not valid JSON" in bad[0].message and "column 1" not in bad[0].message
    items, rejects = read_raw(text, "d.jsonl")
    assert [i.where for i in items] == ["d.jsonl:1"] and items[0].raw == text.split("\n")[0]
    assert [r["where"] for r in rejects] == ["d.jsonl:2", "d.jsonl:3"]
    with pytest.raises(DataError, match=r"^e\.jsonl:3: \(line\): not valid JSON \(Expecting property name"
                                        r" enclosed in double quotes at column 2\)"):
        load_benchmark(text.replace("x\ry", "xy"), "e.jsonl")
    with pytest.raises(EvalError, match=r"^e\.jsonl:3: not valid JSON .* at column 2\)"):
        load_benchmark(text.replace("x\ry", "xy"), "e.jsonl", {"question": "question"})
    # Windows line endings are line endings, not part of the record.
    crlf = parse_jsonl(_line().encode() + b"\r\n" + _line(id="b").encode() + b"\r\n")
    assert [r.id for r in crlf.records] == ["a", "b"] and crlf.rows[1][0] == 2


def test_long_values_are_shortened_and_long_questions_refused(tmp_path):
    huge = "9" * 1_000_000
    res = parse_jsonl(_line(difficulty=huge) + "\n" + _line(id="b", question="q" * 9000) + "\n",
                      "d.jsonl", on_error="collect", max_question_chars=8000)
    assert len(str(res.bad[0])) < 300 and "(1000002 characters)" in str(res.bad[0])
    assert str(res.bad[1]) == ("d.jsonl:2: question: 9000 characters, more than data.max_question_chars=8000; "
                               "shorten it or raise the limit")
    assert parse_jsonl(_line(question="q" * 9000), max_question_chars=0).records   # 0 = no limit


def test_cli_data_check_checks_images(tmp_path, capsys, monkeypatch):
    """Each image must stay inside the data folder, exist and decode; after an object store fails
    to answer, its other images are counted, not tried. --no-images skips all of it."""
    import socket

    from PIL import Image

    from r4b_core.cli import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(data / "images" / "ok.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "outside.png")       # readable, but not ours
    (data / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    refs = ["images/ok.png", "images/missing.png", "images/broken.png", "../outside.png", "images/../images/ok.png",
            "s3://bucket/a.png", "s3://bucket/b.png"]
    p = data / "d.jsonl"
    p.write_text("".join(_line(id=f"r{i}", images=[ref]) + "\n" for i, ref in enumerate(refs)))
    sets = ["--set", f"storage.s3_endpoint_url=http://127.0.0.1:{port}", "--set", "storage.max_attempts=1"]
    assert main(["data", "check", str(p), *sets]) == 2
    out = capsys.readouterr()
    err = out.err.splitlines()
    assert err[0].startswith(f"{p}:2: images[0]: image ") and "no such file" in err[0]
    assert err[1].startswith(f"{p}:3: images[0]: image ") and "is not a readable image" in err[1]
    assert err[2] == (f"{p}:4: images[0]: '../outside.png' points outside the data folder; keep images next to "
                      "the JSONL or give an absolute path or URI")
    assert err[3].startswith(f"{p}:6: images[0]: image 's3://bucket/a.png': cannot read") and "unreachable" in err[3]
    assert err[4] == ("1 more s3:// images not checked: the object store did not answer for s3://bucket/a.png")
    assert len(err) == 5
    assert out.out.strip() == f"{p}: 3 valid records, 4 bad lines; 5 images checked"
    assert main(["data", "check", str(p), "--no-images", *sets]) == 0
    assert capsys.readouterr().out.strip() == f"{p}: 7 valid records, 0 bad lines; images not checked (--no-images)"

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
    res = parse_jsonl(["", _line(), "   "])
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

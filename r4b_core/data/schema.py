"""The record every stage reads and writes, and its JSONL form.

One JSON object per line; images are files next to the JSONL (paths relative to it) or absolute
storage URIs. A bad line raises `DataError` naming file:line:field and the fix; `read_jsonl(...,
on_error="collect")` returns the bad lines instead so curation can quarantine them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from r4b_core.errors import R4BError, decode_utf8, shorten

AnswerType = Literal["integer", "number", "choice", "text"]
Label = Literal["reasoning", "direct"]


class DataError(R4BError):
    """A record that cannot be used; the message names file:line:field."""


class Record(BaseModel):
    """One question about zero or more images.

    `reasoning` is an optional step-by-step trace (the synthetic generator writes one for math
    items). `label` is set by curation: "reasoning" items train with a thinking target,
    "direct" items with an empty think block (modes.target_for). A record without `answer_type`
    gets the type its answer implies (`rewards.infer_answer_type`: `B` is a choice, `-3` an
    integer, `\\sqrt{2}` a number, `red` text).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    question: str = Field(min_length=1)
    answer: str
    answer_type: AnswerType | None = None      # None: inferred from the answer (and choices)
    category: str = "general"
    difficulty: int = Field(1, ge=0, le=10)
    source: str = "unknown"
    objective: bool = True
    reasoning: str | None = None
    label: Label | None = None
    choices: list[str] | None = None

    @field_validator("answer")
    @classmethod
    def _answer_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("answer is empty; every record needs a reference answer")
        return v.strip()

    @model_validator(mode="after")
    def _infer_answer_type(self) -> Record:
        if self.answer_type is None:
            from r4b_core.rewards import infer_answer_type

            self.answer_type = infer_answer_type(self.answer, self.choices)
        return self

    @field_validator("question")
    @classmethod
    def _question_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question is empty")
        return v

    def sft_target(self) -> str:
        """The bi-mode SFT target: thinking when labelled reasoning and a trace exists."""
        from r4b_core import modes

        if self.label == "reasoning" and self.reasoning:
            return modes.thinking_target(self.reasoning, self.answer)
        return modes.direct_target(self.answer)


@dataclass
class BadLine:
    path: str
    line: int
    field: str
    message: str
    raw: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    # (line number, line text) of each record, in the order of `records`.
    rows: list[tuple[int, str]] = field(default_factory=list)


def jsonl_lines(data: str | bytes, path: str = "<jsonl>") -> Iterator[tuple[int, str]]:
    """(line number, text) of every non-blank line of JSONL content.

    Lines end at "\n" only, so a "\r" or U+2028 inside a JSON string (our writer emits U+2028
    raw) never shifts the numbering; a CRLF line ending is dropped. Bytes that are not UTF-8
    raise DataError `path:line: not UTF-8 at byte N`.
    """
    if isinstance(data, (bytes, bytearray)):
        try:
            data = decode_utf8(bytes(data), path)
        except R4BError as exc:
            raise DataError(str(exc)) from None
    for lineno, line in enumerate(data.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            yield lineno, line


def json_object(raw: str) -> dict | str:
    """The JSON object on one line, or why it is not one (columns count from the line's start)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    return obj


def _check_line(path: str, lineno: int, raw: str, max_question_chars: int) -> Record | BadLine:
    obj = json_object(raw)
    if isinstance(obj, str):
        return BadLine(path, lineno, "(line)", obj, raw)
    try:
        record = Record.model_validate(obj)
    except ValidationError as err:
        e = err.errors()[0]
        name = ".".join(str(p) for p in e["loc"]) or "(record)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "missing required field"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(Record.model_fields)}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {shorten(e['input'])})"
        return BadLine(path, lineno, name, msg, raw)
    if max_question_chars and len(record.question) > max_question_chars:
        return BadLine(path, lineno, "question", f"{len(record.question)} characters, more than "
                       f"data.max_question_chars={max_question_chars}; shorten it or raise the limit", raw)
    return record


def parse_jsonl(data: str | bytes, path: str = "<jsonl>", on_error: Literal["raise", "collect"] = "raise",
                max_question_chars: int = 0) -> ReadResult:
    """Validate JSONL content (text or bytes) into records; every stage reads records this way.

    `max_question_chars` (0 = no limit) turns a longer question into a bad line."""
    result = ReadResult()
    seen: dict[str, int] = {}
    for lineno, raw in jsonl_lines(data, path):
        item = _check_line(path, lineno, raw, max_question_chars)
        if isinstance(item, Record) and item.id in seen:
            item = BadLine(path, lineno, "id", f"duplicate id {shorten(item.id)} (first on line {seen[item.id]})",
                           raw)
        if isinstance(item, BadLine):
            if on_error == "raise":
                raise DataError(f"{item}. Fix the line or drop it.")
            result.bad.append(item)
        else:
            seen[item.id] = lineno
            result.records.append(item)
            result.rows.append((lineno, raw))
    return result


def read_jsonl(path: str | Path, on_error: Literal["raise", "collect"] = "raise",
               max_question_chars: int = 0) -> ReadResult:
    """Read and validate a local JSONL file (use storage to fetch remote ones first)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found" if not p.exists() else f"{p}: is a folder, not a JSONL file")
    return parse_jsonl(p.read_bytes(), str(p), on_error, max_question_chars)


def iter_records(path: str | Path) -> Iterator[Record]:
    yield from read_jsonl(path).records


def write_jsonl(path: str | Path, records: Iterable[Record | dict[str, Any]]) -> int:
    """Write records atomically (temp file + rename); returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            obj = r.model_dump(exclude_none=True) if isinstance(r, Record) else r
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(p)
    return n


def resolve_image(jsonl_path: str | Path, image: str) -> str:
    """An image reference as a usable path/URI: relative paths are relative to the JSONL file."""
    if "://" in image or Path(image).is_absolute():
        return image
    return str(Path(jsonl_path).parent / image)

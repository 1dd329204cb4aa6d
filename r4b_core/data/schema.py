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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from r4b_core.errors import R4BError

AnswerType = Literal["integer", "number", "choice", "text"]
Label = Literal["reasoning", "direct"]


class DataError(R4BError):
    """A record that cannot be used; the message names file:line:field."""


class Record(BaseModel):
    """One question about zero or more images.

    `reasoning` is an optional step-by-step trace (the synthetic generator writes one for math
    items). `label` is set by curation: "reasoning" items train with a thinking target,
    "direct" items with an empty think block (modes.target_for).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    question: str = Field(min_length=1)
    answer: str
    answer_type: AnswerType = "text"
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


def _check_line(path: str, lineno: int, raw: str) -> Record | BadLine:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return BadLine(path, lineno, "(line)", f"not valid JSON ({exc.msg} at column {exc.colno})", raw)
    if not isinstance(obj, dict):
        return BadLine(path, lineno, "(line)", f"expected a JSON object, got {type(obj).__name__}", raw)
    try:
        return Record.model_validate(obj)
    except ValidationError as err:
        e = err.errors()[0]
        name = ".".join(str(p) for p in e["loc"]) or "(record)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            msg = "missing required field"
        elif e["type"] == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(Record.model_fields)}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        return BadLine(path, lineno, name, msg, raw)


def parse_jsonl(lines: Iterable[str], path: str = "<jsonl>", on_error: Literal["raise", "collect"] = "raise") -> ReadResult:
    result = ReadResult()
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        item = _check_line(path, lineno, raw)
        if isinstance(item, Record) and item.id in seen:
            item = BadLine(path, lineno, "id", f"duplicate id {item.id!r} (first on line {seen[item.id]})", raw)
        if isinstance(item, BadLine):
            if on_error == "raise":
                raise DataError(f"{item}. Fix the line or drop it.")
            result.bad.append(item)
        else:
            seen[item.id] = lineno
            result.records.append(item)
    return result


def read_jsonl(path: str | Path, on_error: Literal["raise", "collect"] = "raise") -> ReadResult:
    """Read and validate a local JSONL file (use storage to fetch remote ones first)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    with p.open(encoding="utf-8") as fh:
        return parse_jsonl(fh, str(p), on_error)


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

"""The JSONL input of a batch run: [`Example`][attnflow.batch.Example] lines, [`Malformed`][attnflow.batch.Malformed] ones, and their file names."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .._errors import OptionError

# Names kept as they are: a letter or digit, then letters, digits, ".", "_", "-" (lowercase only, so that
# case-insensitive filesystems cannot merge two ids). Anything else gets a hash of the id appended.
_PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_SURROGATE_REASON = "holds a lone surrogate escape (e.g. \\udc80), which is not valid Unicode text"


@dataclasses.dataclass(frozen=True)
class Example:
    """One valid input line: ``id`` (the line's ``id``, else its line number), ``text``, 1-based ``line``,
    ``name``, the filesystem-safe stem of its output file, and ``target``, the decoder's text for an
    encoder-decoder model (None when the line has none)."""

    id: str
    text: str
    line: int
    name: str
    target: str | None = None

    @property
    def text_sha256(self) -> str:
        """SHA-256 of the UTF-8 text: an example file of another text is not this example's result."""
        return _sha256(self.text)

    @property
    def target_sha256(self) -> str | None:
        """SHA-256 of the UTF-8 target, or None without one."""
        return None if self.target is None else _sha256(self.target)


@dataclasses.dataclass(frozen=True)
class Malformed:
    """An input line that was skipped, with why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def safe_name(example_id: str) -> str:
    """The filesystem-safe file stem of an example id; distinct ids give distinct names.

    Lowercase ids of letters, digits, ``.``, ``_`` and ``-`` (at most 80 characters, starting with a letter
    or digit) are used as they are; any other id becomes a cleaned prefix plus 12 hex digits of its SHA-256,
    e.g. ``"Doc 7/b"`` -> ``"Doc_7_b-…"``, so names never clash on case-insensitive filesystems either.
    """
    example_id = str(example_id)
    stem = example_id.split(".")[0]
    if _PLAIN_NAME.fullmatch(example_id) and not example_id.endswith(".") and stem not in _WINDOWS_RESERVED:
        return example_id
    prefix = _UNSAFE.sub("_", example_id).strip("._-")[:48] or "id"
    return f"{prefix}-{_sha256(example_id)[:12]}"


def read_inputs(
    path: str | os.PathLike[str], *, target_field: str = "target"
) -> tuple[list[Example], list[Malformed]]:
    """Parse a JSONL file: one JSON object per line with a non-empty string ``text``, an optional ``id``
    (string or integer; default: the line number) and an optional decoder text under ``target_field``
    (default ``"target"``; a non-empty string: the decoder's text, for encoder-decoder models). Blank lines are
    ignored.

    Returns:
        ``(examples, malformed)``: the valid lines in file order, and the lines skipped with the reason
        (bad UTF-8 or JSON, not an object, missing/empty/non-string text, a bad target, a bad or duplicate
        id, a text, target or id holding a lone surrogate escape).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OptionError(f"Cannot read the input file {str(path)!r}: {exc.strerror or exc}.") from exc
    examples: list[Example] = []
    malformed: list[Malformed] = []
    first_line: dict[str, int] = {}
    names: dict[str, str] = {}
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            malformed.append(Malformed(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        if number == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            malformed.append(Malformed(number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            malformed.append(Malformed(number, f"expected a JSON object with a \"text\" field, got {_json_kind(record)}"))
            continue
        if "text" not in record:
            malformed.append(Malformed(number, "no \"text\" field"))
            continue
        problem = _text_problem("text", record["text"]) or (
            _text_problem(target_field, record[target_field]) if target_field in record else None
        )
        if problem:
            malformed.append(Malformed(number, problem))
            continue
        if "id" in record:
            raw_id = record["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                malformed.append(Malformed(number, f"\"id\" must be a string or an integer, got {_json_kind(raw_id)}"))
                continue
            example_id = str(raw_id)
            if not example_id.strip():
                malformed.append(Malformed(number, "\"id\" is empty"))
                continue
            if _has_surrogate(example_id):
                malformed.append(Malformed(number, f"\"id\" {_SURROGATE_REASON}"))
                continue
        else:
            example_id = str(number)
        if example_id in first_line:
            malformed.append(Malformed(number, f"duplicate id {example_id!r} (first used on line {first_line[example_id]})"))
            continue
        name = safe_name(example_id)
        if name in names:  # only for ids built to collide with another's hashed name
            malformed.append(Malformed(number, f"id {example_id!r} maps to the same file name as id {names[name]!r}"))
            continue
        first_line[example_id] = number
        names[name] = example_id
        examples.append(Example(id=example_id, text=record["text"], line=number, name=name,
                                target=record.get(target_field)))
    return examples, malformed


def _text_problem(field: str, value: Any) -> str | None:
    """Why ``value`` cannot be the line's ``field`` (a non-empty string of valid Unicode), or None."""
    if not isinstance(value, str):
        return f"\"{field}\" must be a string, got {_json_kind(value)}"
    if not value.strip():
        return f"\"{field}\" is empty"
    if _has_surrogate(value):
        return f"\"{field}\" {_SURROGATE_REASON}"
    return None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _has_surrogate(text: str) -> bool:
    """Whether JSON's \\uXXXX escapes smuggled a lone surrogate into ``text`` (it cannot be UTF-8 encoded)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)

"""``attnflow evaluate INPUT.jsonl --out DIR``: faithfulness of raw attention, rollout, flow... over a data set.

Per example the model is run, the methods computed at every layer and compared with blank-out and input
gradients (:func:`attnflow.faithfulness`); each example's result is written atomically to
``DIR/examples/NAME.json``, so a re-run of the same command skips what is done. At the end every example's
result is read back into the long per-layer table ``DIR/faithfulness.csv`` and ``.parquet`` (``method,
reference, layer, mean, std, n``), ``DIR/aopc.csv`` and the plot ``DIR/faithfulness.png``.

It runs in this process, one batch after another (the Dask path of ``attnflow batch`` is not used: each
example's faithfulness costs hundreds of forward passes, which one process already keeps busy).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import OptionError
from .._explanation import explain
from .._models import packaged_model_dir
from .._tensorfile import atomic_write, make_directory
from ..capture._adapter import import_optional, load_model
from ..capture._capture import capture
from ..capture._registry import get_adapter
from ..evaluate import REFERENCES, FaithfulnessReport, faithfulness, plot_rows
from ..methods._fusion import check_max_seconds
from ..methods._options import Options
from ..methods._registry import get_method, list_methods

EXAMPLES_DIR = "examples"
SETTINGS = "settings.json"
TABLE = "faithfulness"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="how faithful each method is to the model, over a JSONL file of texts",
        description=(
            "For every line of INPUT (JSON objects with a \"text\", an optional \"id\" and an optional integer "
            "\"label\", the logit to explain), compute the methods at every layer and compare them with the "
            "model's own sensitivity: Spearman's correlation with blank-out and input-gradient importances, and "
            "ERASER's comprehensiveness/sufficiency (AOPC) against a random ranking. Writes per-example results "
            f"(OUT/{EXAMPLES_DIR}/ID.json; a re-run skips them), the per-layer table OUT/{TABLE}.csv and "
            f".parquet (method, reference, layer, mean, std, n), OUT/aopc.csv and OUT/{TABLE}.png."
        ),
    )
    parser.add_argument("input", help="JSONL file, one {\"text\": ..., \"id\": ..., \"label\": ...} object per line")
    parser.add_argument("--out", default="results", help="output directory (default: results/)")
    parser.add_argument("--model", default=None, help="model directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--adapter", default="transformers", help="adapter that loads the model (default: transformers)")
    parser.add_argument("--methods", default="raw,rollout,flow", help="comma-separated methods (default raw,rollout,flow)")
    parser.add_argument(
        "--references", default=",".join(REFERENCES),
        help=f"comma-separated reference importances (default {','.join(REFERENCES)})",
    )
    parser.add_argument(
        "--target", default="auto",
        help="what is explained: auto (each line's \"label\" logit if given, else the argmax logit, or for a "
        "model without logits the cosine of its mean-pooled embedding to the unablated one), embedding, or a "
        "logit index",
    )
    parser.add_argument("--target-position", type=int, default=None, help="token whose logits are read (per-token logits)")
    parser.add_argument("--blank", default="mask", help="how a token is blanked out: mask, unk, zero or a token id (default mask)")
    parser.add_argument(
        "--source", default="auto",
        help="explained token compared: auto (the mean over all tokens for embedding targets, else the token the "
        "target reads), mean, or a position",
    )
    parser.add_argument("--no-special", action="store_true", help="leave special tokens ([CLS], [SEP]) out")
    parser.add_argument("--signed", action="store_true", help="compare with signed references (default: absolute)")
    parser.add_argument("--no-curves", action="store_true", help="skip deletion/insertion curves and AOPC")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-ranking baseline (default 0)")
    parser.add_argument("--head-fusion", default="mean", choices=("mean", "max", "min"))
    parser.add_argument("--residual", type=float, default=0.5, help="residual weight r in (1-r)A + rI (default 0.5)")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="drop this fraction of lowest weights")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="refuse flow problems estimated longer")
    parser.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a model directory that ships its own Python code (auto_map in config.json): this RUNS that "
        "code with your permissions; only for directories you trust",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class Line:
    """One valid input line."""

    id: str
    text: str
    label: int | None
    number: int

    @property
    def name(self) -> str:
        """A file name for the id: itself when it is plain, else a readable prefix and a hash."""
        if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", self.id) and not self.id.startswith("."):
            return self.id
        digest = hashlib.sha256(self.id.encode()).hexdigest()[:16]
        return f"{re.sub(r'[^A-Za-z0-9_-]', '_', self.id)[:40]}-{digest}"


def read_lines(path: Path) -> tuple[list[Line], list[str]]:
    """The valid lines and, for the others, ``"line N: why"`` (they are skipped)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OptionError(f"Cannot read the input file {str(path)!r}: {exc.strerror or exc}.") from exc
    lines: list[Line] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    names: set[str] = set()
    for number, data in enumerate(raw.split(b"\n"), start=1):
        try:
            text = data.decode("utf-8").lstrip("\ufeff") if number == 1 else data.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"line {number}: not valid UTF-8")
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            problems.append(f"line {number}: needs a JSON object with a non-empty string \"text\"")
            continue
        raw_id = record.get("id", number)
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip():
            problems.append(f"line {number}: \"id\" must be a non-empty string or an integer")
            continue
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            problems.append(f"line {number}: \"label\" must be an integer (the logit to explain)")
            continue
        line = Line(str(raw_id), record["text"], label, number)
        if line.id in seen or line.name in names:
            problems.append(f"line {number}: duplicate id {line.id!r} (first on line {seen.get(line.id, '?')})")
            continue
        seen[line.id] = number
        names.add(line.name)
        lines.append(line)
    return lines, problems


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[str], Options]:
    options = Options(head_fusion=args.head_fusion, residual=args.residual, discard_ratio=args.discard_ratio,
                      max_seconds=check_max_seconds(args.max_seconds))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise OptionError(f"--methods names no method; choose from {', '.join(list_methods())}.")
    for method in methods:
        get_method(method)
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    if not references or any(r not in REFERENCES for r in references):
        raise OptionError(f"--references must name some of {', '.join(REFERENCES)}, got {args.references!r}.")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.max_length is not None and args.max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens, got {args.max_length}.")
    _blank(args.blank)
    _source(args.source)
    if args.target not in ("auto", "embedding") and not _is_int(args.target):
        raise OptionError(f"--target must be auto, embedding or a logit index, got {args.target!r}.")
    return methods, references, options


def _is_int(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", text))


def _blank(value: str) -> str | int:
    if value in ("mask", "unk", "zero"):
        return value
    if re.fullmatch(r"\d+", value):
        return int(value)
    raise OptionError(f"--blank must be mask, unk, zero or a token id, got {value!r}.")


def _source(value: str) -> int | str | None:
    if value == "auto":
        return None
    if value == "mean":
        return value
    if _is_int(value):
        return int(value)
    raise OptionError(f"--source must be auto, mean or a position, got {value!r}.")


def run(args: argparse.Namespace) -> int:
    methods, references, options = check_arguments(args)
    lines, problems = read_lines(Path(args.input))
    for problem in problems:
        print(f"attnflow: {args.input}: {problem}; skipped", file=sys.stderr)
    if not lines:
        raise OptionError(f"{args.input} has no valid line; each needs a JSON object with a \"text\".")
    out = make_directory(Path(args.out))
    examples = make_directory(out / EXAMPLES_DIR, "examples directory")
    location = str(args.model or packaged_model_dir())
    settings = {
        "model": location, "adapter": args.adapter, "methods": methods, "references": references,
        "target": args.target, "target_position": args.target_position, "blank": args.blank, "source": args.source,
        "special": not args.no_special, "signed": args.signed, "curves": not args.no_curves, "seed": args.seed,
        "options": options.to_dict(), "max_length": args.max_length,
    }
    _check_settings(out / SETTINGS, settings)
    pending = [line for line in lines if not (examples / f"{line.name}.json").is_file()]
    if pending:
        adapter = get_adapter(args.adapter)
        model, tokenizer = load_model(adapter, location, trust_remote_code=args.trust_remote_code)
        start = time.perf_counter()
        for first in range(0, len(pending), args.batch_size):
            batch = pending[first : first + args.batch_size]
            _evaluate_batch(batch, adapter, model, tokenizer, methods, references, options, args, examples)
            if not args.no_progress:
                done = first + len(batch)
                print(f"\rattnflow evaluate: {done}/{len(pending)} examples ({time.perf_counter() - start:.0f} s)",
                      end="", file=sys.stderr, flush=True)
        if not args.no_progress:
            print(file=sys.stderr)
    report = FaithfulnessReport.concat(_read_example(examples / f"{line.name}.json") for line in lines)
    _write_tables(out, report)
    skipped = len(lines) - len(pending)
    print(f"{report.batch_size} examples ({skipped} already done); target: {report.settings.get('target')}")
    for reference in report.references:
        print(f"Spearman with {reference}:\n{report.table(reference)}\n")
    if report.comprehensiveness:
        print("AOPC (last layer): " + "; ".join(
            f"{m} comprehensiveness {v['comprehensiveness']:.3f} sufficiency {v['sufficiency']:.3f}"
            for m, v in report.aopc.items()))
    print(f"wrote {out}/{TABLE}.csv, {TABLE}.parquet, aopc.csv, {TABLE}.png")
    return 0


def _check_settings(path: Path, settings: dict[str, Any]) -> None:
    """The settings of a directory's first run; a re-run with other settings would mix two experiments."""
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise OptionError(f"{path} is unreadable ({exc}); remove it or choose another --out.") from exc
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise OptionError(
                f"{path.parent} holds results made with other settings ({', '.join(changed)}); re-run with the same "
                "settings to resume, or choose another --out."
            )
        return
    text = json.dumps(settings, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text), what="settings")


def _evaluate_batch(
    batch: Sequence[Line], adapter: Any, model: Any, tokenizer: Any, methods: list[str], references: list[str],
    options: Options, args: argparse.Namespace, examples: Path,
) -> None:
    inputs = adapter.encode(tokenizer, [line.text for line in batch], max_length=args.max_length)
    trace = capture(model, adapter=adapter, tokens=tokenizer, **inputs)
    source = _source(args.source)
    sources = [source] if isinstance(source, int) else None
    explanation = explain(trace, methods, sources=sources, options=options, all_layers=True)
    labels = [line.label for line in batch]
    if args.target == "embedding":
        target: Any = "embedding"
    elif args.target != "auto":
        target = int(args.target)
    elif all(label is not None for label in labels):
        target = labels
    elif any(label is not None for label in labels):
        raise OptionError("Some lines have a \"label\" and some do not; give every line one, or none.")
    else:
        target = None
    report = faithfulness(
        model, explanation, target=target, target_position=args.target_position, blank=_blank(args.blank),
        tokenizer=tokenizer, references=references, source=source, special=not args.no_special, signed=args.signed,
        curves=not args.no_curves, seed=args.seed, adapter=adapter, **inputs,
    )
    for b, line in enumerate(batch):
        document = {"id": line.id, "line": line.number, "text": line.text, "report": report.select([b]).to_dict()}
        text = json.dumps(document)
        atomic_write(examples / f"{line.name}.json", functools.partial(Path.write_text, data=text), what="example result")


def _read_example(path: Path) -> FaithfulnessReport:
    try:
        document = json.loads(path.read_text())
        return FaithfulnessReport.from_dict(document["report"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OptionError(f"{path} is damaged ({exc}); delete it and re-run to compute it again.") from exc


def _write_tables(out: Path, report: FaithfulnessReport) -> None:
    rows = report.rows()
    columns = ["method", "reference", "layer", "mean", "std", "n"]
    atomic_write(out / f"{TABLE}.csv", lambda tmp: tmp.write_text(_csv(rows, columns)), what="table")
    atomic_write(out / "aopc.csv", lambda tmp: tmp.write_text(_csv(report.aopc_rows(),
                                                                   ["method", "metric", "mean", "std", "n"])),
                 what="table")
    pyarrow = import_optional("pyarrow", "dask")
    import pyarrow.parquet as parquet

    table = pyarrow.table({column: [row[column] for row in rows] for column in columns})
    atomic_write(out / f"{TABLE}.parquet", lambda tmp: parquet.write_table(table, str(tmp)), what="table")

    def draw(tmp: Path) -> None:
        png = tmp.with_name(tmp.name + ".png")  # matplotlib picks the format from the name
        plot_rows(rows, png, title=f"{report.settings.get('model', '')}: {report.batch_size} examples")
        png.replace(tmp)

    atomic_write(out / f"{TABLE}.png", draw, what="plot")


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()

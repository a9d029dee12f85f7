"""``attnflow evaluate INPUT.jsonl --out DIR``: faithfulness of raw attention, rollout, flow, ALTI... over a data set.

Per example the model is run, the methods computed at every layer and compared with blank-out and input
gradients (`attnflow.faithfulness`). Every option is checked before the model loads (the methods against
what the adapter can capture: ``--methods all`` runs every method it can and says which it skips and why).
Each example's result is written atomically to ``DIR/examples/NAME.json`` with its id, a hash of its text and
the run's settings; ``DIR/settings.json`` is written once the first example is stored. A re-run resumes:
an example is reused only when its id, text and label match and every setting matches (a larger ``--methods``
set is allowed: the new methods are computed for the examples already done and merged into their results);
any other difference is refused, naming the setting. One run at a time writes into DIR (an flock lock).

At the end every example's result is read back into (layers numbered from 1: layer 1 is after the first
layer):

- ``DIR/leaderboard.csv`` and ``.parquet``: per reference the methods ranked by the item mean of their
  last-layer Spearman ρ, with the mean ρ over layers, AOPC comprehensiveness and sufficiency, ``n`` and 95%
  bootstrap intervals (columns: `attnflow.evaluate.LEADERBOARD_COLUMNS`), and ``DIR/leaderboard.png``;
- ``DIR/faithfulness.csv`` and ``.parquet``, the long per-layer table (``method, reference, layer, mean, std,
  n``), ``DIR/aopc.csv`` and the plot ``DIR/faithfulness.png``.

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
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import AdapterError, OptionError
from .._explanation import explain
from .._kinds import KINDS
from .._models import packaged_model_dir
from .._tensorfile import atomic_write, make_directory
from ..batch._store import holding
from ..evaluate import (
    DEFAULT_REFERENCES,
    LEADERBOARD_COLUMNS,
    RANDOM,
    REFERENCES,
    FaithfulnessReport,
    faithfulness,
    format_leaderboard,
    plot_leaderboard,
    plot_rows,
)
from ..evaluate._leaderboard import RESAMPLES
from ..methods._options import Options
from ..methods._registry import SKIPPED, list_methods
from ..recording._adapter import Adapter, import_optional, load_model
from ..recording._capture import capture
from ..recording._plan import CapturePlan, capture_plan
from ..recording._registry import get_adapter
from ._common import (
    OPTION_FIELDS,
    add_batch_size_flag,
    add_methods_flag,
    add_model_flags,
    add_option_flags,
    add_progress_flag,
    add_target_flag,
    options_from,
    parse_target,
)

EXAMPLES_DIR = "examples"
SETTINGS = "settings.json"
TABLE = "faithfulness"
LEADERBOARD = "leaderboard"
#: The format of OUT/settings.json and OUT/examples/*.json. Version 2: ids checked with a text hash, the run's
#: settings stored in every example, 1-based layers in the tables. Directories of version 1 are refused.
FORMAT, EXAMPLE_FORMAT, VERSION = "attnflow.evaluate", "attnflow.evaluate-example", 2
SPECIAL_CHOICES = ("exclude", "include")
#: The Options flags of evaluate: every one but --layers (every layer is evaluated; the tables have a row per layer).
EVALUATE_OPTIONS = tuple(name for name in OPTION_FIELDS if name != "layers")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="how faithful each method is to the model, over a JSONL file of texts",
        description=(
            "For every line of INPUT (JSON objects with a \"text\", an optional \"id\" and an optional integer "
            "\"label\", the logit to explain), compute the methods at every layer and compare them with the "
            "model's own sensitivity: Spearman's correlation with blank-out and input-gradient importances, and "
            "ERASER's comprehensiveness/sufficiency (AOPC) against a random ranking. Prints and writes a ranked "
            f"leaderboard per reference (OUT/{LEADERBOARD}.csv, .parquet, .png: last-layer and mean-over-layers ρ, "
            "AOPC, each with n and a 95% bootstrap interval over examples) and names the most faithful method; "
            f"also writes per-example results (OUT/{EXAMPLES_DIR}/ID.json; a re-run resumes), the per-layer table "
            f"OUT/{TABLE}.csv and .parquet (method, reference, layer from 1, mean, std, n), OUT/aopc.csv and "
            f"OUT/{TABLE}.png."
        ),
    )
    parser.add_argument("input", help="JSONL file, one {\"text\": ..., \"id\": ..., \"label\": ...} object per line")
    add_model_flags(parser, out="results")
    add_methods_flag(parser)
    parser.add_argument(
        "--references", default=",".join(DEFAULT_REFERENCES),
        help=f"comma-separated reference importances, of {', '.join(REFERENCES)} (default "
        f"{','.join(DEFAULT_REFERENCES)}; grad_norm_proj: one backward pass where grad_norm of a vector target "
        "needs one per output dimension)",
    )
    add_target_flag(parser)
    parser.add_argument("--target-position", type=int, default=None, help="token whose logits are read (per-token logits)")
    parser.add_argument("--blank", default="mask", help="how a token is blanked out: mask, unk, zero or a token id (default mask)")
    parser.add_argument(
        "--source", default="auto",
        help="explained token compared: auto (the mean over all tokens for embedding targets, else the token the "
        "target reads), mean, or a position",
    )
    parser.add_argument(
        "--special", choices=SPECIAL_CHOICES, default="exclude",
        help="special tokens ([CLS], [SEP]): exclude them from the rankings and the removal curves (default, as "
        "ERASER does) or include them",
    )
    parser.add_argument("--no-special", dest="special", action="store_const", const="exclude",
                        help=argparse.SUPPRESS)  # deprecated: excluding is the default now
    parser.add_argument("--signed", action="store_true", help="compare with signed references (default: absolute)")
    parser.add_argument("--no-curves", action="store_true", help="skip deletion/insertion curves and AOPC")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed (>= 0) of the random-ranking baseline and of the bootstrap intervals (default 0)",
    )
    add_option_flags(parser, EVALUATE_OPTIONS)
    add_batch_size_flag(parser)
    add_progress_flag(parser)
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


@dataclass(frozen=True)
class Config:
    """A checked command line: everything decided before the model loads."""

    adapter: Adapter
    plan: CapturePlan
    references: list[str]
    options: Options
    settings: dict[str, Any]  # must match to resume (methods aside)


def check_arguments(args: argparse.Namespace) -> Config:
    """Every option checked, and the methods against what the adapter captures: before the model loads."""
    options = options_from(args, EVALUATE_OPTIONS)
    if isinstance(args.seed, bool) or not isinstance(args.seed, int) or args.seed < 0:
        raise OptionError(f"--seed must be an integer >= 0 (numpy's generators take no negative seed), got {args.seed}.")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.max_length is not None and args.max_length < 2:
        raise OptionError(f"--max-length must be at least 2 tokens, got {args.max_length}.")
    if args.special not in SPECIAL_CHOICES:
        raise OptionError(f"--special must be exclude or include, got {args.special!r}.")
    _blank(args.blank)
    _source(args.source)
    parse_target(args.target)
    references = [r.strip() for r in args.references.split(",") if r.strip()]
    unknown = [r for r in references if r not in REFERENCES]
    if not references or unknown or len(set(references)) != len(references):
        raise OptionError(f"--references must name some of {', '.join(REFERENCES)} once each, got {args.references!r}.")
    adapter = get_adapter(args.adapter)
    if args.methods.strip() == "all":
        plan = capture_plan("all", adapter)
    else:
        plan = capture_plan([m.strip() for m in args.methods.split(",") if m.strip()], adapter)
    if not plan.methods:
        raise AdapterError(f"Adapter {adapter.name!r} can capture none of the registered methods ({', '.join(list_methods())}).")
    captures = set(adapter.captures)
    lacking = [r for r in references if REFERENCES[r] not in captures]
    if lacking:
        raise AdapterError(
            f"Adapter {adapter.name!r} cannot compute the references {', '.join(lacking)}: it does not declare "
            f"{sorted({REFERENCES[r] for r in lacking})}. Leave them out of --references."
        )
    if not args.no_curves and "ablation" not in captures:
        raise AdapterError(f"Adapter {adapter.name!r} cannot blank tokens out, which the removal curves need; pass --no-curves.")
    settings = {
        "model": str(args.model or packaged_model_dir()), "adapter": adapter.name, "references": references,
        "target": args.target, "target_position": args.target_position, "blank": args.blank, "source": args.source,
        "special": args.special, "signed": bool(args.signed), "curves": not args.no_curves, "seed": int(args.seed),
        "options": options.to_dict(), "max_length": args.max_length,
    }
    return Config(adapter, plan, references, options, settings)


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


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Work:
    """One input line to compute: all its methods, or (``stored`` given) those its stored result lacks."""

    line: Line
    methods: tuple[str, ...]
    stored: dict[str, Any] | None = None


def run(args: argparse.Namespace) -> int:
    config = check_arguments(args)
    lines, problems = read_lines(Path(args.input))
    for problem in problems:
        print(f"attnflow: {args.input}: {problem}; skipped", file=sys.stderr)
    if not lines:
        raise OptionError(f"{args.input} has no valid line; each needs a JSON object with a \"text\".")
    plan = config.plan
    for method, reason in plan.skipped.items():
        print(f"attnflow evaluate: skipping {method}: {reason}", file=sys.stderr)
    out = make_directory(Path(args.out))
    with holding(out):
        examples = make_directory(out / EXAMPLES_DIR, "examples directory")
        _check_settings(out / SETTINGS, config)
        work, notes = _plan_work(examples, lines, config)
        for note in notes:
            print(f"attnflow evaluate: {note}", file=sys.stderr)
        if work:
            _announce(work, config, args)
            adapter = config.adapter
            model, tokenizer = load_model(adapter, config.settings["model"], trust_remote_code=args.trust_remote_code)
            start = time.perf_counter()
            done = 0
            said: list[str] = []

            def notice(text: str) -> None:  # said once per run, before the first costly step
                if not said:
                    said.append(text)
                    print(f"\nattnflow evaluate: {text}", file=sys.stderr)

            for batch in _batches(work, args.batch_size):
                _evaluate_batch(batch, model, tokenizer, config, args, examples, notice)
                if done == 0:
                    _write_settings(out / SETTINGS, config)  # only once an example is stored
                done += len(batch)
                if not args.no_progress:
                    print(f"\rattnflow evaluate: {done}/{len(work)} examples ({time.perf_counter() - start:.0f} s)",
                          end="", file=sys.stderr, flush=True)
            if not args.no_progress:
                print(file=sys.stderr)
        documents = [_read_document(examples / f"{line.name}.json") for line in lines]
        report = FaithfulnessReport.concat(
            _restrict(FaithfulnessReport.from_dict(d["report"]), plan.methods) for d in documents)
        skipped = {m: why for d in documents for m, why in (d.get("skipped") or {}).items() if m in plan.methods}
        _write_tables(out, report, args.seed)
    fresh = sum(1 for w in work if w.stored is None)
    print(f"{report.batch_size} examples ({report.batch_size - fresh} already done"
          + (f", {len(work) - fresh} given new methods" if len(work) > fresh else "")
          + f"); target: {report.settings.get('target')}")
    print("special tokens ([CLS], [SEP]...): " + ("included in" if args.special == "include" else "excluded from")
          + " the rankings and the removal curves (--special " + ("exclude" if args.special == "include" else "include")
          + " to change)")
    for method, reason in {**plan.skipped, **skipped}.items():
        print(f"skipped {method}: {reason}")
    for reference in report.references:
        print(f"\nSpearman with {reference} per layer (mean±std over examples; L1 = after the first layer):\n"
              f"{report.table(reference)}")
    for reference in report.references:
        rows = report.leaderboard(reference, seed=args.seed, resamples=RESAMPLES)
        verdict = report.lead(reference, seed=args.seed, resamples=RESAMPLES)
        print("\n" + format_leaderboard(rows, verdict, special=args.special == "include"))
    print(f"\nwrote {out}/{LEADERBOARD}.csv, {LEADERBOARD}.parquet, {LEADERBOARD}.png, {TABLE}.csv, {TABLE}.parquet, "
          f"aopc.csv, {TABLE}.png")
    return 0


def _restrict(report: FaithfulnessReport, methods: Sequence[str]) -> FaithfulnessReport:
    """The report's methods among ``methods`` (and the random baseline), in that order: a directory may hold
    more methods than this run tables (it never holds fewer: a run may only add methods)."""
    keep = [m for m in methods if m in report.layers] + [RANDOM]
    if list(report.methods) == keep:
        return report
    document = report.to_dict()
    for key in ("layers", "correlations", "comprehensiveness", "sufficiency", "item_curves"):
        document[key] = {m: document[key][m] for m in keep if m in document[key]}
    return FaithfulnessReport.from_dict(document)


def _announce(work: list[Work], config: Config, args: argparse.Namespace) -> None:
    """Say what costs time before it starts."""
    methods = set().union(*(w.methods for w in work))
    if "value_zeroing" in methods:
        print(f"attnflow evaluate: value_zeroing costs {KINDS['value_zeroing'].cost} per layer (each token's values "
              "zeroed in turn, every layer re-run): expect it to dominate the capture on long texts.", file=sys.stderr)


def _check_settings(path: Path, config: Config) -> None:
    """A directory's settings must equal this run's (a larger --methods set aside): else two experiments mix."""
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OptionError(f"{path} is unreadable ({exc}); remove it or choose another --out.") from exc
    if not isinstance(before, dict) or before.get("format") != FORMAT or before.get("version") != VERSION:
        raise OptionError(
            f"{path.parent} holds results of an older attnflow evaluate (no format {FORMAT!r} version {VERSION}); "
            "choose another --out, or delete the directory to start again."
        )
    _compare(before.get("settings"), before.get("methods"), config, f"{path.parent}")


def _compare(settings: Any, methods: Any, config: Config, where: str) -> None:
    mine = config.settings
    if not isinstance(settings, dict):
        raise OptionError(f"{where}: damaged settings; delete it or choose another --out.")
    changed = sorted(k for k in set(settings) | set(mine) if settings.get(k) != mine.get(k))
    missing = [m for m in (methods or []) if m not in config.plan.methods]
    if changed or missing:
        parts = [f"{k} (stored {_shown(settings.get(k))}, now {_shown(mine.get(k))})" for k in changed]
        if missing:
            parts.append(f"methods (stored results have {', '.join(methods)}; this run leaves out {', '.join(missing)}: "
                         "a re-run may add methods but not drop any)")
        raise OptionError(
            f"{where} holds results made with other settings: {'; '.join(parts)}. Re-run with the same settings to "
            "resume, or choose another --out."
        )


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _write_settings(path: Path, config: Config) -> None:
    methods = list(config.plan.methods)
    try:
        before = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        before = {}
    if isinstance(before, dict) and before.get("methods") == methods:
        return
    text = json.dumps({"format": FORMAT, "version": VERSION, "settings": config.settings, "methods": methods}, indent=1)
    atomic_write(path, lambda tmp: tmp.write_text(text), what="settings")


def _plan_work(examples: Path, lines: list[Line], config: Config) -> tuple[list[Work], list[str]]:
    """Which lines need computing (all methods, or the ones their stored result lacks), and notes on stored
    results that are not reused; stored results of other settings are refused."""
    work: list[Work] = []
    notes: list[str] = []
    wanted = config.plan.methods
    for line in lines:
        path = examples / f"{line.name}.json"
        if not path.is_file():
            work.append(Work(line, wanted))
            continue
        try:
            document = _read_document(path)
        except OptionError as exc:
            notes.append(f"{exc} It is computed again.")
            work.append(Work(line, wanted))
            continue
        if (document.get("id"), document.get("text_sha256"), document.get("label")) != (line.id, _sha256(line.text),
                                                                                          line.label):
            notes.append(f"line {line.number}: id {line.id!r} has another text or label than its stored result; "
                         "it is computed again.")
            work.append(Work(line, wanted))
            continue
        _compare(document.get("settings"), document.get("methods"), config, str(path))
        have = set(document.get("methods") or []) | set(document.get("skipped") or {})
        lacking = tuple(m for m in wanted if m not in have)
        if lacking:
            work.append(Work(line, lacking, document))
    return work, notes


def _batches(work: list[Work], size: int) -> list[list[Work]]:
    """Batches of at most ``size`` lines that need the same methods."""
    groups: dict[tuple[str, ...], list[Work]] = {}
    for item in work:
        groups.setdefault(item.methods, []).append(item)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def _capture_target(target: Any) -> Any:
    """The target of the attention gradients (grad_rollout, attn_grad): faithfulness' target where the capture
    reads it the same way; per-line labels become a callable picking each item's logit."""
    if target is None or isinstance(target, (int, str)):
        return target

    labels = list(target)

    def pick(output: Any) -> Any:
        logits = getattr(output, "logits", output)
        if getattr(logits, "ndim", 0) == 3:
            logits = logits[:, 0]
        return logits[list(range(len(labels))), labels]

    return pick


def _evaluate_batch(
    batch: Sequence[Work], model: Any, tokenizer: Any, config: Config, args: argparse.Namespace, examples: Path,
    notice: Any,
) -> None:
    adapter = config.adapter
    methods = batch[0].methods
    inputs = adapter.encode(tokenizer, [w.line.text for w in batch], max_length=args.max_length)
    labels = [w.line.label for w in batch]
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
    everything = config.plan.everything
    trace = capture(model, adapter=adapter, tokens=tokenizer, methods="all" if everything else list(methods),
                    target=_capture_target(target), target_position=args.target_position, **inputs)
    skipped = {m: str(why) for m, why in (trace.metadata.get(SKIPPED) or {}).items() if m in methods}
    runnable = [m for m in methods if m not in skipped]
    source = _source(args.source)
    sources = [source] if isinstance(source, int) else None
    report = None
    if runnable:
        explanation = explain(trace, runnable, sources=sources, options=config.options, all_layers=True)
        report = faithfulness(
            model, explanation, target=target, target_position=args.target_position, blank=_blank(args.blank),
            tokenizer=tokenizer, references=config.references, source=source, special=args.special == "include",
            signed=args.signed, curves=not args.no_curves, seed=args.seed, adapter=adapter, notice=notice, **inputs,
        )
    for b, item in enumerate(batch):
        line = item.line
        mine = report.select([b]) if report is not None else None
        before = item.stored
        if before is not None:
            old = FaithfulnessReport.from_dict(before["report"])
            merged = old.with_methods(mine) if mine is not None else old
            done = list(before.get("methods") or []) + runnable
            gone = {**(before.get("skipped") or {}), **skipped}
        elif mine is not None:
            merged, done, gone = mine, runnable, skipped
        else:
            raise OptionError(f"line {line.number}: the model supports none of the methods asked for "
                              f"({'; '.join(f'{m}: {why}' for m, why in skipped.items())}).")
        document = {
            "format": EXAMPLE_FORMAT, "version": VERSION, "id": line.id, "line": line.number, "text": line.text,
            "text_sha256": _sha256(line.text), "label": line.label, "settings": config.settings, "methods": done,
            "skipped": gone, "report": merged.to_dict(),
        }
        text = json.dumps(document)
        atomic_write(examples / f"{line.name}.json", functools.partial(Path.write_text, data=text), what="example result")


def _read_document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or document.get("format") != EXAMPLE_FORMAT or document.get("version") != VERSION:
            raise ValueError(f"not an {EXAMPLE_FORMAT} file of version {VERSION}")
        FaithfulnessReport.from_dict(document["report"])
        return document
    except (OSError, ValueError, KeyError, TypeError, OptionError) as exc:
        raise OptionError(f"{path} is damaged or of another version ({exc}).") from exc


def _write_tables(out: Path, report: FaithfulnessReport, seed: int) -> None:
    rows = report.rows()
    columns = ["method", "reference", "layer", "mean", "std", "n"]
    atomic_write(out / f"{TABLE}.csv", lambda tmp: tmp.write_text(_csv(rows, columns)), what="table")
    atomic_write(out / "aopc.csv", lambda tmp: tmp.write_text(_csv(report.aopc_rows(),
                                                                   ["method", "metric", "mean", "std", "n"])),
                 what="table")
    board = [row for reference in report.references
             for row in report.leaderboard(reference, seed=seed, resamples=RESAMPLES)]
    atomic_write(out / f"{LEADERBOARD}.csv", lambda tmp: tmp.write_text(_csv(board, list(LEADERBOARD_COLUMNS))),
                 what="table")
    pyarrow = import_optional("pyarrow", "dask")
    import pyarrow.parquet as parquet

    table = pyarrow.table({column: [row[column] for row in rows] for column in columns})
    atomic_write(out / f"{TABLE}.parquet", lambda tmp: parquet.write_table(table, str(tmp)), what="table")
    board_table = pyarrow.table({column: [_none(row[column]) for row in board] for column in LEADERBOARD_COLUMNS})
    atomic_write(out / f"{LEADERBOARD}.parquet", lambda tmp: parquet.write_table(board_table, str(tmp)), what="table")
    title = f"{Path(str(report.settings.get('model', ''))).name}: {report.batch_size} examples"

    def draw(tmp: Path, plot: Any, source: Any) -> None:
        png = tmp.with_name(tmp.name + ".png")  # matplotlib picks the format from the name
        plot(source, png, title=title)
        png.replace(tmp)

    atomic_write(out / f"{TABLE}.png", functools.partial(draw, plot=plot_rows, source=rows), what="plot")
    atomic_write(out / f"{LEADERBOARD}.png", functools.partial(draw, plot=plot_leaderboard, source=board), what="plot")


def _none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()

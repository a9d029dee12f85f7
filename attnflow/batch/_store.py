"""What a batch run keeps in its output directory: example files, the score table, the manifest, the lock.

Layout of an output directory::

    OUT/batch.json                  settings of the run; a re-run with other settings is refused
    OUT/examples/NAME.safetensors   per example: an attnflow.Explanation file (attnflow.load reads it)
    OUT/scores.parquet              per-token scores of every finished example of the input
    OUT/summary.json                the last run's summary (malformed lines, failures, timings)
    OUT/.attnflow-batch.lock        held (flock) by the run writing into OUT: who it is (pid, host, command)

Every file is written atomically (a temporary name, then ``os.replace``), so a killed run leaves whole
files or none. An example file is trusted only when every checksum matches and its ``metadata["batch"]``
names the same id, text, target and settings; anything else (damaged, or an ``attnflow.batch-example``
file of attnflow 0.1) is recomputed by the next run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shlex
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import AttnflowError, OptionError, TraceFileError
from .._explanation import Explanation, load_explanation
from .._tensorfile import atomic_write, peek_format
from ..recording._adapter import import_optional
from ._inputs import Example, safe_name
from ._settings import Settings

MANIFEST_FORMAT = "attnflow.batch"
# 2: example files are attnflow.Explanation files and the settings hold an Options record. An output
# directory of version 1 (attnflow 0.1) is resumed by recomputing every example.
MANIFEST_VERSION = 2
#: The example files of manifest version 1: per-method matrices, not explanations.
OLD_EXAMPLE_FORMAT = "attnflow.batch-example"
MANIFEST = "batch.json"
LOCK = ".attnflow-batch.lock"
EXAMPLES_DIR = "examples"
TABLE = "scores.parquet"
SUMMARY = "summary.json"
SUFFIX = ".safetensors"
TABLE_COLUMNS = ("id", "method", "layer", "source", "source_token", "stream", "token_index", "token", "score")
# atomic_write's temporary names: .NAME.PID.THREAD.tmp (.NAME.PID.tmp from older versions).
_TMP = re.compile(r"\.(?P<name>.+?)\.(?P<pid>\d+)(?:\.\d+)?\.tmp")
# Rows of the score table written at once (one Parquet row group): memory stays flat for any input size.
_ROW_GROUP = 1 << 20


class OutputInUseError(AttnflowError):
    """Another run is writing into the output directory (the message says which process)."""


# -- example files -------------------------------------------------------------------------------------


def example_path(out: Path, name: str) -> Path:
    return out / EXAMPLES_DIR / f"{name}{SUFFIX}"


def example_metadata(example: Example, digest: str) -> dict[str, Any]:
    """What an example's explanation keeps under ``metadata["batch"]``: which input line and settings it is of."""
    return {
        "id": example.id, "line": example.line, "text": example.text, "text_sha256": example.text_sha256,
        "target": example.target, "target_sha256": example.target_sha256, "settings": digest,
    }


def write_example(out: Path, example: Example, data: bytes) -> None:
    """Write an explanation file's bytes (as a worker produced them) as the example's file, atomically."""
    atomic_write(example_path(out, example.name), lambda tmp: tmp.write_bytes(data), what="batch example")


def read_example(path: Path) -> Explanation:
    """An example file as an [`Explanation`][attnflow.Explanation], every checksum and its batch metadata checked.

    Raises:
        TraceFileError: missing, damaged (a flipped byte anywhere), of the old ``attnflow.batch-example``
            format, or not written by a batch run.
    """
    if peek_format(path) == OLD_EXAMPLE_FORMAT:
        raise TraceFileError(
            f"{str(path)!r} was written by an older attnflow (format {OLD_EXAMPLE_FORMAT!r}, per-method matrices "
            "rather than an explanation); re-run the batch to recompute it."
        )
    explanation = load_explanation(path)
    problem = _batch_problem(explanation.metadata.get("batch"))
    if problem:
        raise TraceFileError(f"{str(path)!r} is an explanation but not an attnflow batch example: {problem}.")
    return explanation


def _batch_problem(batch: Any) -> str | None:
    """What is wrong with an explanation's ``metadata["batch"]``, or None. Checksums make damage unlikely;
    this keeps an explanation saved by hand from passing for the result of an input line."""
    if not isinstance(batch, Mapping):
        return "its metadata has no \"batch\" record"
    wrong = [key for key in ("id", "text", "text_sha256", "settings") if not isinstance(batch.get(key), str)]
    wrong += [key for key in ("target", "target_sha256") if not isinstance(batch.get(key), (str, type(None)))]
    if not isinstance(batch.get("line"), int) or isinstance(batch.get("line"), bool):
        wrong.append("line")
    return f"its batch record's {wrong} are missing or of the wrong type" if wrong else None


def _is_result_of(explanation: Explanation, example: Example, digest: str) -> bool:
    batch = explanation.metadata["batch"]
    return (
        batch["id"] == example.id and batch["text_sha256"] == example.text_sha256
        and batch["target_sha256"] == example.target_sha256 and batch["settings"] == digest
    )


def example_state(out: Path, example: Example, digest: str) -> tuple[bool, str | None]:
    """``(done, why it is recomputed)``: done when its file is intact and of this text, target and settings;
    the reason is set only for a file that exists but cannot be trusted (damaged, older format)."""
    path = example_path(out, example.name)
    if not path.exists():
        return False, None
    try:
        explanation = read_example(path)
    except TraceFileError as exc:
        return False, str(exc)
    return _is_result_of(explanation, example, digest), None


def load_example(out: str | os.PathLike[str], example_id: str | None = None) -> Explanation:
    """Read one example written by [`attnflow.run_batch`][attnflow.run_batch] (``attnflow.load`` reads the file too).

    Args:
        out: the output directory (then give ``example_id``), or the path of an example file.
        example_id: the example's id.

    Returns:
        The example's [`attnflow.Explanation`][attnflow.Explanation]: one item (batch 1) over its real tokens, the run's
        methods, sources and options; ``metadata["batch"]`` holds its ``id``, input ``line``, ``text``,
        ``target`` (None without one), their SHA-256 and the run's ``settings`` digest.

    Raises:
        TraceFileError: no such example, its file is damaged (every array and the header are checksummed),
            or it is of the format attnflow 0.1 wrote (re-run the batch to recompute it).
    """
    path = Path(out) if example_id is None else example_path(Path(out), safe_name(str(example_id)))
    return read_example(path)


# -- the score table -------------------------------------------------------------------------------------


def write_table(out: Path, examples: Sequence[Example], digest: str, failed: list[tuple[str, str]]) -> int:
    """Rebuild ``scores.parquet`` from the intact example files of ``examples`` that are done; returns its rows.
    A file found damaged now is left out of the table and appended to ``failed``."""
    pa = import_optional("pyarrow", "dask")
    pq = import_optional("pyarrow.parquet", "dask")
    text = pa.dictionary(pa.int32(), pa.string())
    schema = pa.schema([
        ("id", pa.string()), ("method", text), ("layer", pa.int16()), ("source", pa.int32()),
        ("source_token", pa.string()), ("stream", text), ("token_index", pa.int32()), ("token", pa.string()),
        ("score", pa.float32()),
    ])
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        parts: list[Any] = []
        buffered = 0
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for example in examples:
                path = example_path(out, example.name)
                if not path.exists():
                    continue
                try:
                    explanation = read_example(path)
                except TraceFileError as exc:
                    failed.append((example.id, f"{exc} It was left out of {TABLE}; re-run to recompute it."))
                    continue
                if not _is_result_of(explanation, example, digest):
                    continue
                parts.append(_table_part(pa, schema, explanation, example.id))
                rows += parts[-1].num_rows
                buffered += parts[-1].num_rows
                if buffered >= _ROW_GROUP:
                    writer.write_table(pa.concat_tables(parts))
                    parts, buffered = [], 0
            if parts:
                writer.write_table(pa.concat_tables(parts))

    atomic_write(out / TABLE, write, what="score table")
    return rows


def _table_part(pa: Any, schema: Any, explanation: Explanation, example_id: str) -> Any:
    """The rows of one example: its explanation's [`to_frame`][attnflow.Explanation.to_frame], with its id."""
    frame = explanation.to_frame()
    columns = {
        "id": pa.array([example_id] * len(frame), pa.string()),
        "method": pa.array(frame["method"].tolist(), pa.string()).dictionary_encode(),
        "layer": pa.array(frame["layer"].to_numpy(np.int16)),
        "source": pa.array(frame["source"].to_numpy(np.int32)),
        "source_token": pa.array(frame["source_token"].tolist(), pa.string()),
        "stream": pa.array(frame["stream"].tolist(), pa.string()).dictionary_encode(),
        "token_index": pa.array(frame["token_index"].to_numpy(np.int32)),
        "token": pa.array(frame["token"].tolist(), pa.string()),
        "score": pa.array(frame["score"].to_numpy(np.float32)),
    }
    return pa.table(columns, schema=schema)


# -- the directory: manifest, temporary files, lock ---------------------------------------------------------


def write_json(path: Path, document: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n"))


def check_manifest(out: Path, settings: Settings) -> str | None:
    """Refuse an output directory holding results of other settings (or of a newer attnflow); else record
    these settings. Returns a note for the user when the directory was written by an older attnflow,
    whose examples are all recomputed (their files are of the old format)."""
    path = out / MANIFEST
    record = settings.record()
    has_results = any((out / EXAMPLES_DIR).glob(f"*{SUFFIX}"))
    note = None
    if path.exists() and has_results:
        try:
            previous = json.loads(path.read_text())
            kind, version, old = previous["format"], previous["version"], previous["settings"]
            if kind != MANIFEST_FORMAT or not isinstance(old, dict):
                raise ValueError(f"format {kind!r}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OptionError(f"{str(path)!r} is not an attnflow batch manifest ({exc}); choose another --out.") from exc
        if not isinstance(version, int) or version > MANIFEST_VERSION:
            raise OptionError(
                f"{str(out)!r} was written by a newer attnflow (batch format {version!r}; this one writes "
                f"{MANIFEST_VERSION}). Upgrade attnflow to resume it, or choose another output directory."
            )
        if version == MANIFEST_VERSION:
            if old != record:
                changed = ", ".join(
                    f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in sorted(set(old) | set(record))
                    if old.get(k) != record.get(k)
                )
                raise OptionError(
                    f"{str(out)!r} holds results computed with other settings ({changed}). Re-run with the same "
                    "settings to resume, or choose another output directory."
                )
            return None
        note = (
            f"{str(out)!r} was written by an older attnflow (batch format {version}, example files of format "
            f"{OLD_EXAMPLE_FORMAT!r}): every example is recomputed as an attnflow.Explanation file."
        )
    from .. import __version__

    write_json(path, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "attnflow": __version__, "settings": record})
    return note


def clean_temporary_files(out: Path) -> None:
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
    except (ProcessLookupError, OverflowError):  # OverflowError: a number no process id can be
        return False
    except OSError:  # exists but is someone else's
        return True
    return True


@contextlib.contextmanager
def holding(out: Path) -> Iterator[None]:
    """Hold ``OUT/.attnflow-batch.lock`` exclusively for the block (fcntl.flock, released however this process
    ends), with who holds it written inside; raise [`OutputInUseError`][attnflow.OutputInUseError] at once if another run holds it."""
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

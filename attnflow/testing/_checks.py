"""The conformance checks every adapter must pass: attnflow's own and third parties' alike."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import load
from ..recording._adapter import Adapter
from ..recording._capture import attach, capture
from ..trace import AttentionTrace
from ._state import differences, output_of, snapshot

#: (args, kwargs) of one forward pass.
Inputs = tuple[tuple, dict]
#: A reference: per layer, the weights, or ``(query stream, key stream, weights)``.
Reference = Sequence[Any]

CHECKS = (
    "declaration", "weights", "restored", "raises", "interrupt", "nested", "overlapping", "threads", "save_load",
    "unregistered", "light_import",
)
"""The conformance checks [`check_adapter`][attnflow.testing.check_adapter] runs, in order (each one test of
[`AdapterConformance`][attnflow.testing.AdapterConformance])."""
#: Frameworks an adapter module must not import when it is loaded (it imports them when it runs).
FRAMEWORKS = ("torch", "jax", "flax", "transformers", "timm", "tensorflow", "penzai")
_DEFAULT_ATOL = {"float16": 2e-3, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-9}


class InjectedFailure(RuntimeError):
    """Raised by the kit inside a forward pass, to check that the adapter undoes everything anyway."""


@dataclasses.dataclass
class Subject:
    """An adapter under test, with the means to make models and inputs."""

    adapter: Adapter
    make_model: Callable[[], Any]
    make_inputs: Callable[[Any], Inputs]
    reference: Callable[[Any, Inputs], Reference] | None = None
    atol: float | None = None

    def fresh(self) -> tuple[Any, Inputs]:
        model = self.make_model()
        inputs = self.make_inputs(model)
        if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)):
            raise TypeError(f"make_inputs(model) must return (args, kwargs), got {type(inputs).__name__}.")
        return model, (tuple(inputs[0]), dict(inputs[1]))

    def forward(self, model: Any, inputs: Inputs) -> Any:
        args, kwargs = inputs
        return self.adapter.run(model, *args, **kwargs)

    def capture(self, model: Any, inputs: Inputs) -> AttentionTrace:
        with attach(model, adapter=self.adapter) as recorder:
            self.forward(model, inputs)
        return recorder.trace


def check_adapter(
    adapter: Adapter | type[Adapter],
    make_model: Callable[[], Any],
    make_inputs: Callable[[Any], Inputs],
    reference: Callable[[Any, Inputs], Reference] | None = None,
    *,
    checks: Iterable[str] = CHECKS,
    atol: float | None = None,
) -> None:
    """Run the conformance checks on ``adapter``; raises ``AssertionError`` naming the failed check and why.

    Args:
        adapter: the adapter (an instance, or a class built with no arguments); it need not be registered.
        make_model: returns a fresh model each call.
        make_inputs: ``make_inputs(model)`` returns ``(args, kwargs)`` of one forward pass (as
            ``adapter.run(model, *args, **kwargs)`` takes them; for Flax linen, ``args`` start with the variables).
        reference: ``reference(model, inputs)`` returns the expected attention per layer in the trace's
            order: arrays ``(batch, heads, query, key)``, or ``(query_stream, key_stream, array)`` triples
            (key_stream None for self-attention). Default: the model's own eager attention where the kit knows
            how to get it (Hugging Face models), else the ``weights`` check fails asking for one.
        checks: which of `CHECKS` to run.
        atol: tolerance of the ``weights`` check (default by the dtype the model computed in: 1e-5 for float32).
    """
    if isinstance(adapter, type):
        adapter = adapter()
    subject = Subject(adapter, make_model, make_inputs, reference, atol)
    for name in checks:
        if name not in CHECKS:
            raise ValueError(f"Unknown check {name!r}; the checks are {list(CHECKS)}.")
        try:
            _CHECKS[name](subject)
        except AssertionError as exc:
            raise AssertionError(f"adapter {adapter.name!r}: check {name!r} failed: {exc}") from None
        except Exception as exc:  # the adapter (or attnflow, on what it was given) raised
            raise AssertionError(
                f"adapter {adapter.name!r}: check {name!r} failed: {type(exc).__name__}: {exc}"
            ) from exc


def _fail(condition: bool, why: str) -> None:
    if not condition:
        raise AssertionError(why)


# -- the checks ----------------------------------------------------------------------------------------------
def check_declaration(subject: Subject) -> None:
    """The adapter passes the registry's validation (name, framework, hooks signature, options, captures)."""
    from .._errors import AdapterRegistrationError
    from ..recording._registry import _validate

    try:
        _validate(subject.adapter, source=f"adapter {subject.adapter.name!r}")
    except AdapterRegistrationError as exc:
        raise AssertionError(str(exc)) from None


def check_weights(subject: Subject) -> None:
    """The captured weights equal the reference, layer by layer (and stream by stream, where given)."""
    model, inputs = subject.fresh()
    trace = subject.capture(model, inputs)
    expected = _reference(subject, model, inputs)
    _fail(trace.num_layers == len(expected),
          f"the trace has {trace.num_layers} layers {trace.layer_names[:4]}..., the reference {len(expected)}")
    for index, (layer, item) in enumerate(zip(trace.layers, expected)):
        query = key = None
        if isinstance(item, tuple) and len(item) == 3:
            query, key, item = item
        want = _numpy(item)
        _fail(layer.weights.shape == want.shape,
              f"layer {index} ({layer.name!r}) has shape {layer.weights.shape}, the reference {want.shape} "
              "(batch, heads, query, key): axes swapped or heads merged?")
        tolerance = subject.atol if subject.atol is not None else _DEFAULT_ATOL.get(layer.source_dtype, 1e-5)
        real = (
            trace.streams[layer.query_stream].mask[:, None, :, None]  # type: ignore[index]
            & trace.streams[layer.key_stream].mask[:, None, None, :]  # type: ignore[index]
        )
        diff = float(np.abs(np.where(real, layer.weights - want, 0.0)).max())
        _fail(diff <= tolerance, f"layer {index} ({layer.name!r}) differs from the reference by {diff:.3g} "
              f"(tolerance {tolerance:g})")
        if query is not None:
            _fail((layer.query_stream, layer.key_stream) == (query, key or query),
                  f"layer {index} ({layer.name!r}) is ({layer.query_stream!r}, {layer.key_stream!r}), the reference "
                  f"({query!r}, {key or query!r}) (query stream, key stream)")


def check_restored(subject: Subject) -> None:
    """After the block the model and the process are exactly as before, and outputs are identical."""
    model, inputs = subject.fresh()
    before, output = snapshot(model), output_of(lambda: subject.forward(model, inputs))
    with attach(model, adapter=subject.adapter):
        inside = output_of(lambda: subject.forward(model, inputs))
    _assert_restored(subject, model, inputs, before, output)
    # while attached the model may take another code path for the same maths (eager instead of fused
    # attention): equal up to float32 rounding; after the block it must be exactly the same (above)
    close = len(inside) == len(output) and all(np.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(inside, output))
    _fail(close, "the model's output while attached differs from its output without attnflow")


def check_raises(subject: Subject, failure: type[BaseException] = InjectedFailure) -> None:
    """Everything is undone when the forward pass raises (the kit raises from inside the first recording)."""
    model, inputs = subject.fresh()
    before, output = snapshot(model), output_of(lambda: subject.forward(model, inputs))
    raised = False
    try:
        with attach(model, adapter=subject.adapter) as recorder:
            _raise_on_record(recorder, failure)
            subject.forward(model, inputs)
    except failure:
        raised = True
    _fail(raised, f"the injected {failure.__name__} did not propagate out of the block (was it swallowed?)")
    _assert_restored(subject, model, inputs, before, output)


def check_interrupt(subject: Subject) -> None:
    """Everything is undone when Ctrl-C (KeyboardInterrupt) arrives during the forward pass."""
    check_raises(subject, KeyboardInterrupt)


def check_nested(subject: Subject) -> None:
    """attach inside attach on the same model: both recorders see the same attention; all undone after."""
    model, inputs = subject.fresh()
    before, output = snapshot(model), output_of(lambda: subject.forward(model, inputs))
    with attach(model, adapter=subject.adapter) as outer:
        with attach(model, adapter=subject.adapter) as inner:
            subject.forward(model, inputs)
    _fail(bool(outer.traces) and bool(inner.traces), "one of two nested recorders saw no forward pass")
    _assert_equal_traces(outer.trace, inner.trace, "the outer and the inner recorder")
    _assert_restored(subject, model, inputs, before, output)


def check_overlapping(subject: Subject) -> None:
    """Attaches left out of order (a.enter, b.enter, a.exit, b.exit), on one model and on two, undo everything."""
    for two_models in (False, True):
        first_model, inputs = subject.fresh()
        second_model = subject.fresh()[0] if two_models else first_model
        snapshots = [snapshot(m) for m in (first_model, second_model)]
        outputs = [output_of(functools.partial(subject.forward, m, inputs)) for m in (first_model, second_model)]
        a, b = attach(first_model, adapter=subject.adapter), attach(second_model, adapter=subject.adapter)
        with contextlib.ExitStack() as cleanup:
            a.__enter__()
            cleanup.callback(a.__exit__, None, None, None)
            recorder = b.__enter__()
            cleanup.callback(b.__exit__, None, None, None)
            a.__exit__(None, None, None)
            cleanup.pop_all()
            cleanup.callback(b.__exit__, None, None, None)
            subject.forward(second_model, inputs)  # b is still attached: it must still record
        _fail(bool(recorder.traces), "an attach left open after another one closed recorded nothing")
        for model, before, output in zip((first_model, second_model), snapshots, outputs):
            _assert_restored(subject, model, inputs, before, output)


def check_threads(subject: Subject) -> None:
    """Two threads capture at once, each on its own model: both traces are right, both models restored."""
    models = [subject.fresh() for _ in range(2)]
    befores = [(snapshot(m), output_of(functools.partial(subject.forward, m, i))) for m, i in models]
    expected = [subject.capture(m, i) for m, i in models]
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def work(k: int) -> None:
        try:
            barrier.wait(timeout=60)
            for _ in range(3):
                results[k] = subject.capture(*models[k])
        except BaseException as exc:  # reported by the main thread
            results[k] = exc
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, result in enumerate(results):
        _fail(isinstance(result, AttentionTrace), f"thread {k} failed: {result!r}")
        _assert_equal_traces(result, expected[k], f"thread {k}'s trace and a capture on its own")
        model, inputs = models[k]
        _assert_restored(subject, model, inputs, *befores[k])


def check_save_load(subject: Subject) -> None:
    """A captured trace survives save and load exactly."""
    model, inputs = subject.fresh()
    trace = subject.capture(model, inputs)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.safetensors"
        trace.save(path)
        _assert_equal_traces(load(path), trace, "the loaded and the saved trace")


def check_unregistered(subject: Subject) -> None:
    """The adapter instance works through capture() whether or not it is registered."""
    model, (args, kwargs) = subject.fresh()
    trace = capture(model, *args, adapter=subject.adapter, **kwargs)
    _fail(trace.num_layers > 0, "capture() through the instance recorded no layer")


def check_light_import(subject: Subject) -> None:
    """Importing the adapter's module imports no deep-learning framework (entry points are loaded eagerly)."""
    module = type(subject.adapter).__module__
    if module in ("__main__", "builtins") or "<locals>" in type(subject.adapter).__qualname__:
        return  # defined in a script or a test function: not loaded through an entry point
    try:
        importlib.import_module(module)
    except ImportError:
        return
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    _fail(result.returncode == 0, f"importing {module!r} failed in a fresh process: {result.stderr.strip()[-300:]}")
    loaded = result.stdout.strip()
    _fail(not loaded, f"importing {module!r} imports {loaded}; import frameworks inside the adapter's methods")


_CHECKS: dict[str, Callable[[Subject], None]] = {
    "declaration": check_declaration, "weights": check_weights, "restored": check_restored, "raises": check_raises,
    "interrupt": check_interrupt, "nested": check_nested, "overlapping": check_overlapping, "threads": check_threads,
    "save_load": check_save_load, "unregistered": check_unregistered, "light_import": check_light_import,
}


# -- helpers ---------------------------------------------------------------------------------------------
def _raise_on_record(recorder: Any, failure: type[BaseException]) -> None:
    original = recorder.record

    def record(*args: Any, **kwargs: Any) -> None:
        recorder.record = original
        raise failure("injected by attnflow.testing")

    recorder.record = record


def _assert_restored(subject: Subject, model: Any, inputs: Inputs, before: dict, output: list[np.ndarray]) -> None:
    changed = differences(before, snapshot(model))
    _fail(not changed, "the model or the process changed after the block: " + "; ".join(changed[:5]))
    again = output_of(lambda: subject.forward(model, inputs))
    _fail(len(again) == len(output) and all(np.array_equal(a, b) for a, b in zip(again, output)),
          "a plain forward pass after the block gives a different output than before it")


def _assert_equal_traces(a: AttentionTrace, b: AttentionTrace, what: str) -> None:
    _fail(a.layer_names == b.layer_names, f"{what} have different layers: {a.layer_names} vs {b.layer_names}")
    _fail(list(a.streams) == list(b.streams), f"{what} have different streams")
    for la, lb in zip(a.layers, b.layers):
        _fail(la.weights.shape == lb.weights.shape and bool(np.array_equal(la.weights, lb.weights)),
              f"{what} differ at layer {la.name!r}")
        _fail((la.query_stream, la.key_stream) == (lb.query_stream, lb.key_stream),
              f"{what} give layer {la.name!r} different streams")
    for name, sa in a.streams.items():
        sb = b.streams[name]
        _fail(bool(np.array_equal(sa._completed(), sb._completed())) and sa.tokens == sb.tokens,
              f"{what} differ in stream {name!r}")


def _reference(subject: Subject, model: Any, inputs: Inputs) -> Reference:
    if subject.reference is not None:
        return list(subject.reference(model, inputs))
    from ._references import eager_attention

    found = eager_attention(model, inputs)
    _fail(found is not None, "no reference: pass reference=... (the kit knows the eager attention of Hugging Face "
          "models only)")
    return found  # type: ignore[return-value]


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float64)

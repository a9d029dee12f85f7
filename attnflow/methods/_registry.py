"""The method registry: built-in and third-party methods, found the same way (``attnflow.methods``).

A method is a small object ([`Method`][attnflow.Method]): a name, what it needs from the trace, whether it is a
per-layer view or cumulative, the paper it implements, and ``compute``, which turns a trace into scores
on the trace's network. Third-party methods subclass [`Method`][attnflow.Method] and are registered with
[`register_method`][attnflow.register_method] or published under the ``attnflow.methods`` entry-point group; attnflow's own
methods register through that group too.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .._errors import MethodError, OptionError
from .._kinds import KINDS, how_to_get
from .._plugins import Registry
from ..network._network import EdgeWeights
from ..trace import AttentionTrace
from ._options import Options

ENTRY_POINT_GROUP = "attnflow.methods"

#: Scores of one method: input stream -> ``(layers, batch, sources, input tokens)`` float64.
Scores = dict[str, np.ndarray]



class Method(abc.ABC):
    """Base class of every method (built-in or third-party).

    Class attributes:
        name: what users pass to [`attnflow.explain`][attnflow.explain] (``"rollout"``).
        needs: trace fields it needs: ``"weights"``, and per-layer extras such as ``"attn_grad"`` or ``"values"``.
        cumulative: True for methods that roll information through the layers (rollout, flow); False for
            per-layer views (raw attention).
        all_layers_by_default: whether [`attnflow.explain`][attnflow.explain] computes every layer unless told otherwise
            (False where every layer costs as much as the last, e.g. flow).
        reference: the paper, for documentation and titles.
        order: where the method sorts in listings and tables (lower first).
        edge_residual: the residual rollout and flow mix into this method's edge weights when
            ``options.weights`` names it (None: ``options.residual``; 0 for contributions that already
            include the residual connection).
        row_sum: what each real explained token's scores sum to, over every input stream together:
            ``"one"`` (a distribution: entries >= 0, rows sum to 1), ``"at_most_one"`` (entries >= 0, rows
            sum to at most 1) or ``"free"`` (no constraint: flow, where each entry is its own max-flow;
            gradients; norms). [`attnflow.testing.check_method`][attnflow.testing.check_method] holds a method to it.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ("weights",)
    cumulative: ClassVar[bool] = False
    all_layers_by_default: ClassVar[bool] = True
    reference: ClassVar[str] = ""
    order: ClassVar[int] = 100
    edge_residual: ClassVar[float | None] = None
    row_sum: ClassVar[str] = "free"

    @abc.abstractmethod
    def compute(
        self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None, all_layers: bool
    ) -> Scores:
        """Scores of ``stream``'s output tokens ``sources`` (all when None): input stream ->
        ``(layers, batch, len(sources) or stream length, input length)``; ``layers`` is 1 unless ``all_layers``."""

    def edge_weights(self, trace: AttentionTrace, options: Options) -> EdgeWeights | None:
        """For contribution methods: the per-layer matrices rollout and flow route through when
        ``options.weights`` names this method. None: the method gives no edge weights."""
        return None

    def check(self, trace: AttentionTrace) -> None:
        """Raise [`MethodError`][attnflow.MethodError] when the trace lacks what the method needs."""
        for need in self.needs:
            if need == "weights":
                continue
            marker = KINDS[need].marker if need in KINDS else need
            missing = [layer.name for layer in trace.layers if (marker or need) not in layer.extras]
            if missing:
                raise MethodError(
                    f"Method {self.name!r} needs {need!r} per layer, which this trace lacks (layers {missing[:3]}"
                    f"{'...' if len(missing) > 3 else ''}). {how_to_get(need)}."
                )

    def __repr__(self) -> str:
        return f"<method {self.name!r}>"


def _missing(name: Any, registered: tuple[str, ...]) -> OptionError:
    return OptionError(f"No method named {name!r}; registered methods: {', '.join(registered)}.")


def _validate_plugin(method: Any, source: str) -> Method:
    return _validate(method, source=source)


#: The methods: built-ins and plugins, in their ``order``.
METHODS: Registry[Method] = Registry(
    group=ENTRY_POINT_GROUP, what="method", validate=_validate_plugin, duplicate=MethodError, missing=_missing,
    order=lambda m: (m.order, m.name),
)


def register_method(method: Method | type[Method], *, replace: bool = False) -> Method:
    """Add a method to the registry; returns the registered instance.

    Raises:
        MethodError: the method breaks the contract (the message says which part), or its name is taken
            and ``replace`` is False.
    """
    return METHODS.register(method, replace=replace)


def unregister_method(name: str) -> None:
    """Remove a method by name (built-ins come back in a new process)."""
    try:
        METHODS.unregister(name)
    except OptionError as exc:
        raise MethodError(str(exc)) from None


def list_methods() -> tuple[str, ...]:
    """Names of the registered methods, built-ins first (in their ``order``); [`get_method`][attnflow.get_method] gives the
    method itself."""
    return METHODS.names()


#: What a method's rows may sum to (``Method.row_sum``).
ROW_SUMS = ("one", "at_most_one", "free")
#: The method list that stands for every registered method (``explain(trace, "all")``, ``--methods all``).
ALL = "all"
#: Trace and explanation metadata key: methods of ``"all"`` left out -> why.
SKIPPED = "skipped_methods"


def method_names(methods: Iterable[str | Method] | str) -> list[str | Method]:
    """``methods`` as a list: ``"all"`` stays ``["all"]``, ``"a,b"`` is split, one name becomes a list."""
    if isinstance(methods, Method):
        return [methods]
    if isinstance(methods, str):
        return [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(methods, (bytes, Mapping)) or not hasattr(methods, "__iter__"):
        raise OptionError(f"methods must be method names, a list of them or 'all'; got {methods!r}.")
    return list(methods)


def get_method(name: str | Method) -> Method:
    """The method registered under ``name`` (a [`Method`][attnflow.Method] instance is returned as it is)."""
    if isinstance(name, Method):
        return name
    return METHODS.get(name)


def _validate(method: Any, *, source: str) -> Method:
    if inspect.isclass(method):
        if not issubclass(method, Method):
            raise MethodError(f"{source}: {method.__qualname__} is not a subclass of attnflow.Method.")
        if inspect.isabstract(method):
            missing = sorted(getattr(method, "__abstractmethods__", ()))
            raise MethodError(f"{source}: {method.__qualname__} does not implement {missing}.")
        try:
            method = method()
        except Exception as exc:
            raise MethodError(f"{source}: {method.__qualname__}() failed ({exc}); a method class must build with no arguments.") from exc
    if not isinstance(method, Method):
        raise MethodError(f"{source}: expected an attnflow.Method subclass or instance, got {type(method).__name__}.")
    cls = type(method).__qualname__
    if not isinstance(method.name, str) or not method.name.isidentifier():
        raise MethodError(f"{source}: {cls}.name must be an identifier-like string, got {method.name!r}.")
    if isinstance(method.needs, str) or not all(isinstance(n, str) for n in method.needs) or "weights" not in method.needs:
        raise MethodError(f"{source}: {cls}.needs must be a tuple of names including 'weights', got {method.needs!r}.")
    if method.row_sum not in ROW_SUMS:
        raise MethodError(f"{source}: {cls}.row_sum must be one of {list(ROW_SUMS)}, got {method.row_sum!r}.")
    for flag in ("cumulative", "all_layers_by_default"):
        if not isinstance(getattr(method, flag), bool):
            raise MethodError(f"{source}: {cls}.{flag} must be True or False.")
    parameters = inspect.signature(method.compute).parameters
    wanted = ("trace", "options", "stream", "sources", "all_layers")
    missing_params = [p for p in wanted if p not in parameters]
    if missing_params:
        raise MethodError(
            f"{source}: {cls}.compute must take (trace, options, *, stream, sources, all_layers); it lacks "
            f"{missing_params}."
        )
    return method

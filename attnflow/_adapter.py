"""The adapter contract: what a framework or model-family adapter implements, and the Recorder it fills."""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import numpy as np

from ._errors import AdapterError, MissingDependencyError
from .trace import AttentionTrace, LayerAttention


def import_optional(module: str, extra: str) -> Any:
    """Import an optional framework, or raise :class:`MissingDependencyError` naming the extra to install.

    Adapters call this instead of a top-level ``import torch`` so that ``import attnflow`` stays light.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"This needs {module!r}, which is not installed ({exc}). Install it with: "
            f"pip install 'attnflow[{extra}]'"
        ) from exc


class Recorder:
    """Collects attention while hooks are live; one :class:`AttentionTrace` per forward pass.

    Adapters call :meth:`start_call` when a forward pass begins (with what they know of the inputs),
    :meth:`record` for each attention layer as it runs, and :meth:`end_call` when the pass returns.
    Users read :attr:`trace` (the last pass) or :attr:`traces` (all of them).
    """

    def __init__(self, *, framework: str, model_name: str = "", tokens: Any = None, adapter: str = ""):
        self.framework = framework
        self.model_name = model_name
        self.adapter = adapter
        self._labels = tokens  # labels (list / list of lists) or a tokenizer with convert_ids_to_tokens
        self._traces: list[AttentionTrace] = []
        self._layers: list[LayerAttention] | None = None
        self._call: dict[str, Any] = {}

    # -- adapter side -------------------------------------------------------------------------------
    def start_call(
        self, *, mask: Any = None, input_ids: Any = None, causal: bool | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Begin a forward pass. ``mask``: ``(batch, seq)`` real-token mask; ``input_ids``: ``(batch, seq)``."""
        self._layers = []
        self._call = {"mask": mask, "input_ids": input_ids, "causal": causal, "metadata": dict(metadata or {})}

    def record(
        self, name: str, weights: np.ndarray, *, kind: str = "self", source_dtype: str = "",
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Record one layer's ``(batch, heads, query, key)`` attention probabilities as a numpy array."""
        if self._layers is None:
            self.start_call()
        layers = self._layers if self._layers is not None else []
        layers.append(
            LayerAttention(
                weights=np.asarray(weights), name=name, kind=kind,
                source_dtype=source_dtype or str(np.asarray(weights).dtype), extras=dict(extras or {}),
            )
        )
        self._layers = layers

    def end_call(self) -> None:
        """Finish the forward pass: validate what was recorded and keep it as a trace."""
        if self._layers is None:
            return
        layers, call = self._layers, self._call
        self._layers, self._call = None, {}
        if not layers:
            raise AdapterError(
                f"The forward pass ran, but adapter {self.adapter!r} recorded no attention. The model's attention "
                "modules were not recognised or did not run; pass adapter=... or module selectors explicitly."
            )
        mask = None if call["mask"] is None else np.asarray(call["mask"]).astype(bool)
        self._traces.append(
            AttentionTrace(
                layers, mask=mask, tokens=self._token_labels(call["input_ids"], layers[0].weights.shape),
                causal=call["causal"], framework=self.framework, model_name=self.model_name,
                metadata={"adapter": self.adapter, **call["metadata"]},
            )
        )

    def _token_labels(self, input_ids: Any, shape: Sequence[int]) -> list[list[str]] | None:
        labels = self._labels
        if labels is None:
            if input_ids is None:
                return None
            return [[str(int(t)) for t in row] for row in np.asarray(input_ids)]
        if hasattr(labels, "convert_ids_to_tokens"):
            if input_ids is None:
                raise AdapterError("A tokenizer was given for labels, but the adapter saw no input_ids.")
            return [list(labels.convert_ids_to_tokens([int(t) for t in row])) for row in np.asarray(input_ids)]
        if len(labels) and isinstance(labels[0], str):
            return [list(labels)]
        return [list(row) for row in labels]

    # -- user side ----------------------------------------------------------------------------------
    @property
    def traces(self) -> list[AttentionTrace]:
        """Every finished forward pass, oldest first."""
        if self._layers:  # a pass whose end the adapter could not see (e.g. the user stopped early)
            self.end_call()
        return list(self._traces)

    @property
    def trace(self) -> AttentionTrace:
        """The attention of the last forward pass run while attached."""
        traces = self.traces
        if not traces:
            raise AdapterError(
                "No forward pass ran while attached: call the model inside the `with attnflow.attach(model)` block."
            )
        return traces[-1]


class Adapter(abc.ABC):
    """Base class of every adapter: a built-in one or a third party's.

    Subclasses set the class attributes and implement :meth:`claims` and :meth:`hooks`. Register an
    instance with :func:`attnflow.register_adapter`, or through the ``attnflow.adapters`` entry-point
    group (value: ``"package.module:AdapterClass"``). Import the framework inside methods (use
    :func:`attnflow.import_optional`), never at module top level: entry points are loaded by
    ``attnflow.capture`` on machines that may not have your framework.
    """

    #: Unique adapter name, e.g. ``"transformers"``; what users pass as ``adapter=``.
    name: ClassVar[str] = ""
    #: Top-level module the models come from (``"torch"``, ``"flax"``). The adapter is asked to claim a
    #: model only when this module has already been imported: no model can exist otherwise.
    framework: ClassVar[str] = ""
    #: The array library the model computes in (``"torch"``, ``"jax"``), stored as ``trace.framework``;
    #: empty means the same as ``framework``.
    array_library: ClassVar[str] = ""
    #: The pip extra that installs the framework (``pip install 'attnflow[EXTRA]'``).
    extra: ClassVar[str] = ""
    #: Adapters with higher priority are asked first (model-family adapters above generic ones).
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def claims(self, model: Any) -> bool:
        """Whether this adapter can capture ``model``; cheap, no forward pass."""

    @abc.abstractmethod
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> AbstractContextManager[None]:
        """A context manager that installs the capture on ``model`` and fully undoes it on exit,
        also when the body raises."""

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one forward pass for :func:`attnflow.capture`; by default ``model(*args, **kwargs)``."""
        return model(*args, **kwargs)

    def model_name(self, model: Any) -> str:
        """A short name for the model, stored in the trace."""
        return type(model).__name__

    # Optional: adapters that can load a model from a path power the command line (explain, batch).
    def load_model(self, location: str) -> tuple[Any, Any]:
        """Load ``(model, tokenizer)`` from a local directory (or a hub id where there is network)."""
        raise AdapterError(
            f"Adapter {self.name!r} cannot load models by path; load the model yourself and use "
            "attnflow.capture(), or pick an adapter that can (e.g. --adapter transformers)."
        )

    def encode(self, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None) -> dict[str, Any]:
        """Tokenise ``texts`` (padded batch) into the keyword arguments the model's forward takes."""
        raise AdapterError(
            f"Adapter {self.name!r} cannot tokenise text; pick an adapter that can (e.g. transformers)."
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} framework={self.framework!r}>"


"""A pytest class to subclass: the conformance checks as separate tests."""

from __future__ import annotations

from typing import Any

from ._checks import check_adapter


class AdapterConformance:
    """Subclass as ``class TestMyAdapter(AdapterConformance)`` and set ``adapter``, ``make_model`` and
    ``make_inputs`` (and ``reference`` where the kit cannot get the model's own attention); every check of
    [`attnflow.testing.check_adapter`][attnflow.testing.check_adapter] becomes one test."""

    adapter: Any = None
    atol: float | None = None

    def make_model(self) -> Any:
        """Return a fresh model (override it; the default raises ``NotImplementedError``)."""
        raise NotImplementedError("set make_model: it returns a fresh model")

    def make_inputs(self, model: Any) -> tuple[tuple, dict]:
        """Return ``(args, kwargs)`` of one forward pass of ``model`` (override it)."""
        raise NotImplementedError("set make_inputs: it returns (args, kwargs) of one forward pass")

    def reference(self, model: Any, inputs: tuple[tuple, dict]) -> Any:
        """The model's own attention weights for ``inputs``, where the kit cannot get them itself:
        a sequence of ``(batch, heads, query, key)`` arrays, one per layer. The default, None, lets the kit
        compute them."""
        return None

    def _check(self, name: str) -> None:
        overridden = type(self).reference is not AdapterConformance.reference
        check_adapter(
            self.adapter, self.make_model, self.make_inputs, self.reference if overridden else None,
            checks=[name], atol=self.atol,
        )

    def test_declaration(self) -> None:
        """The ``declaration`` check: the adapter passes the registry's validation (name, framework, hooks signature, options, captures)."""
        self._check("declaration")

    def test_weights(self) -> None:
        """The ``weights`` check: the captured weights equal the reference, layer by layer (and stream by stream, where given)."""
        self._check("weights")

    def test_restored(self) -> None:
        """The ``restored`` check: after the block the model and the process are exactly as before, and outputs are identical."""
        self._check("restored")

    def test_raises(self) -> None:
        """The ``raises`` check: everything is undone when the forward pass raises."""
        self._check("raises")

    def test_interrupt(self) -> None:
        """The ``interrupt`` check: everything is undone when Ctrl-C (KeyboardInterrupt) arrives during the forward pass."""
        self._check("interrupt")

    def test_nested(self) -> None:
        """The ``nested`` check: attach inside attach on the same model: both recorders see the same attention; all undone after."""
        self._check("nested")

    def test_overlapping(self) -> None:
        """The ``overlapping`` check: attaches left out of order, on one model and on two, undo everything."""
        self._check("overlapping")

    def test_threads(self) -> None:
        """The ``threads`` check: two threads capture at once, each on its own model: both traces right, both models restored."""
        self._check("threads")

    def test_save_load(self) -> None:
        """The ``save_load`` check: a captured trace survives save and load exactly."""
        self._check("save_load")

    def test_unregistered(self) -> None:
        """The ``unregistered`` check: the adapter instance works through capture() whether or not it is registered."""
        self._check("unregistered")

    def test_light_import(self) -> None:
        """The ``light_import`` check: importing the adapter's module imports no deep-learning framework."""
        self._check("light_import")

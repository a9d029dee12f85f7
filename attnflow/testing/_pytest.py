"""A pytest class to subclass: the conformance checks as separate tests."""

from __future__ import annotations

from typing import Any

from ._checks import check_adapter


class AdapterConformance:
    """Subclass as ``class TestMyAdapter(AdapterConformance)`` and set ``adapter``, ``make_model`` and
    ``make_inputs`` (and ``reference`` where the kit cannot get the model's own attention); every check of
    :func:`attnflow.testing.check_adapter` becomes one test."""

    adapter: Any = None
    atol: float | None = None

    def make_model(self) -> Any:
        raise NotImplementedError("set make_model: it returns a fresh model")

    def make_inputs(self, model: Any) -> tuple[tuple, dict]:
        raise NotImplementedError("set make_inputs: it returns (args, kwargs) of one forward pass")

    def reference(self, model: Any, inputs: tuple[tuple, dict]) -> Any:
        return None

    def _check(self, name: str) -> None:
        overridden = type(self).reference is not AdapterConformance.reference
        check_adapter(
            self.adapter, self.make_model, self.make_inputs, self.reference if overridden else None,
            checks=[name], atol=self.atol,
        )

    def test_declaration(self) -> None:
        self._check("declaration")

    def test_weights(self) -> None:
        self._check("weights")

    def test_restored(self) -> None:
        self._check("restored")

    def test_raises(self) -> None:
        self._check("raises")

    def test_interrupt(self) -> None:
        self._check("interrupt")

    def test_nested(self) -> None:
        self._check("nested")

    def test_overlapping(self) -> None:
        self._check("overlapping")

    def test_threads(self) -> None:
        self._check("threads")

    def test_save_load(self) -> None:
        self._check("save_load")

    def test_unregistered(self) -> None:
        self._check("unregistered")

    def test_light_import(self) -> None:
        self._check("light_import")

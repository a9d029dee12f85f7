"""The ``Examples:`` of the main entry points' docstrings run as doctests (tiny hand-made traces; the capture
examples build a two-layer torch encoder, and are skipped without torch)."""

from __future__ import annotations

import doctest

import pytest

import attnflow

#: The objects whose docstrings carry a runnable example, by name, and whether the example needs torch.
EXAMPLES = {
    "capture": (attnflow.capture, True),
    "attach": (attnflow.attach, True),
    "AttentionTrace.from_arrays": (attnflow.AttentionTrace.from_arrays, False),
    "raw": (attnflow.raw, False),
    "rollout": (attnflow.rollout, False),
    "flow": (attnflow.flow, False),
    "explain": (attnflow.explain, False),
    "Explanation": (attnflow.Explanation, False),
    "compare": (attnflow.compare, False),
}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_docstring_example_runs(name):
    obj, _ = EXAMPLES[name]  # the torch examples need torch, which make test installs: a missing one fails
    obj = getattr(obj, "__wrapped__", obj)
    test = doctest.DocTestParser().get_doctest(obj.__doc__ or "", {}, name, None, 0)
    assert test.examples, f"{name}'s docstring has no example"
    failures: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: failures.append(text))
    assert runner.failures == 0, "".join(failures)


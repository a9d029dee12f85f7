"""attnflow.testing: the conformance kit adapter authors run in their own test suites.

``check_adapter(adapter, make_model, make_inputs, reference=None)`` runs every check and raises
``AssertionError`` naming the failed one and why; ``AdapterConformance`` is a pytest class whose subclasses
run the same checks as separate tests. ``check_method(method)`` does the same for methods: the invariants
every method keeps (shapes, padding, row sums, sources, layer prefixes) on traces the kit captures itself. Beside them: references the project trusts (the paper's rollout
and networkx flow, numpy attention, a Hugging Face model's own eager attention) and tiny models with a
distinct prime size on every axis. attnflow's own adapters are tested with this kit.
"""

from . import _models as models
from ._checks import CHECKS as CHECKS
from ._checks import InjectedFailure as InjectedFailure
from ._checks import check_adapter as check_adapter
from ._methods import METHOD_CHECKS as METHOD_CHECKS
from ._methods import check_method as check_method
from ._methods import method_traces as method_traces
from ._pytest import AdapterConformance as AdapterConformance
from ._references import eager_attention as eager_attention
from ._references import numpy_attention as numpy_attention
from ._references import paper_flow as paper_flow
from ._references import paper_rollout as paper_rollout

__all__ = [
    "CHECKS", "METHOD_CHECKS", "AdapterConformance", "InjectedFailure", "check_adapter", "check_method",
    "eager_attention", "method_traces", "models", "numpy_attention", "paper_flow", "paper_rollout",
]

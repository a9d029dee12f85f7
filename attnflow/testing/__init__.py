"""attnflow.testing: the conformance kit adapter authors run in their own test suites.

``check_adapter(adapter, make_model, make_inputs, reference=None)`` runs every check and raises
``AssertionError`` naming the failed one and why; ``AdapterConformance`` is a pytest class whose subclasses
run the same checks as separate tests. Beside them: references the project trusts (the paper's rollout
and networkx flow, numpy attention, a Hugging Face model's own eager attention) and tiny models with a
distinct prime size on every axis. attnflow's own adapters are tested with this kit.
"""

from . import _models as models
from ._checks import CHECKS as CHECKS
from ._checks import InjectedFailure as InjectedFailure
from ._checks import check_adapter as check_adapter
from ._pytest import AdapterConformance as AdapterConformance
from ._references import eager_attention as eager_attention
from ._references import numpy_attention as numpy_attention
from ._references import paper_flow as paper_flow
from ._references import paper_rollout as paper_rollout

__all__ = [
    "CHECKS", "AdapterConformance", "InjectedFailure", "check_adapter", "eager_attention", "models",
    "numpy_attention", "paper_flow", "paper_rollout",
]

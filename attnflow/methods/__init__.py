"""The methods: raw attention, attention rollout and attention flow over a trace's network."""

from ._flow import flow as flow
from ._flow import flow_network as flow_network
from ._fusion import fuse_heads as fuse_heads
from ._rollout import raw as raw
from ._rollout import rollout as rollout

__all__ = ["flow", "flow_network", "fuse_heads", "raw", "rollout"]

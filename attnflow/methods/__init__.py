"""The methods: raw attention, attention rollout and attention flow over a trace's network, and the base
classes a method author builds on ([`Method`][attnflow.Method], [`LayerMethod`][attnflow.LayerMethod], [`RoutedMethod`][attnflow.RoutedMethod])."""

from ._flow import flow as flow
from ._flow import flow_network as flow_network
from ._fusion import fuse_heads as fuse_heads
from ._kit import LayerMethod as LayerMethod
from ._kit import RoutedMethod as RoutedMethod
from ._registry import Method as Method
from ._rollout import raw as raw
from ._rollout import rollout as rollout

__all__ = ["LayerMethod", "Method", "RoutedMethod", "flow", "flow_network", "fuse_heads", "raw", "rollout"]

"""The attention network of a trace: one layered DAG per batch item that every method routes through.

See `attnflow.network._network` for its nodes and edges, `route` for proportional routing
(rollout) and `attnflow.network._layered` for the layout the exact max-flow solvers take.
"""

from ._network import Network as Network
from ._network import NodeGroup as NodeGroup
from ._network import Step as Step
from ._network import build_network as build_network
from ._network import route as route
from ._network import route_rows as route_rows

__all__ = ["Network", "NodeGroup", "Step", "build_network", "route", "route_rows"]

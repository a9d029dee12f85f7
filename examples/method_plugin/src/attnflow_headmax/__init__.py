"""head_max: each layer's attention from its most confident head (the head whose rows are most peaked).

A worked example of a third-party method on attnflow's kit (see docs/methods.md): ``attnflow.LayerMethod``
handles sources, padding and layer selection, so the method is its ``layer_scores``. Once installed, it
appears in ``attnflow.explain(trace, "all")``, ``attnflow explain --methods head_max``, ``attnflow batch``,
``attnflow evaluate`` and the HTML page, and ``attnflow.testing.check_method("head_max")`` holds it to the
invariants every method keeps.
"""

from __future__ import annotations

import numpy as np

import attnflow


class HeadMax(attnflow.LayerMethod):
    """Per layer, the head whose real rows have the largest mean maximum weight; its attention over the real
    keys (rows sum to 1). Not from a paper: a baseline that asks "what does the sharpest head do?"."""

    name = "head_max"
    row_sum = "one"
    reference = "a worked example of attnflow's method kit"

    def layer_scores(self, trace, layer, item, options):
        found = trace.layers[layer]
        q = trace.valid_index(item, found.query_stream)
        k = trace.valid_index(item, found.key_stream)
        heads = np.asarray(found.weights[item], dtype=np.float64)[:, q][:, :, k]  # (heads, q, k)
        sharpest = int(heads.max(-1).mean(-1).argmax())
        return heads[sharpest]

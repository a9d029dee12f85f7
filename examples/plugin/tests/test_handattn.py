"""The plugin passes attnflow's conformance kit, found through its entry point like any third party."""

from __future__ import annotations

import numpy as np
import torch
from attnflow_handattn import HandAttnAdapter
from attnflow_handattn.model import HandAttentionNet

import attnflow
from attnflow.testing import AdapterConformance, numpy_attention

BATCH, TOKENS = 2, 7


def make_model():
    torch.manual_seed(0)
    return HandAttentionNet().eval()


def make_inputs(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 17, (BATCH, TOKENS), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, 5:] = 0
    return (ids,), {"attention_mask": mask}


def reference(model, inputs):
    """Each layer's attention recomputed in numpy from the layer's input and its projection weights."""
    (ids,), kwargs = inputs
    found = []

    def grab(module, args):
        x, padding = args[0].detach().double().numpy(), args[1].numpy()
        wq, bq = module.q_proj.weight.detach().double().numpy(), module.q_proj.bias.detach().double().numpy()
        wk, bk = module.k_proj.weight.detach().double().numpy(), module.k_proj.bias.detach().double().numpy()
        heads = module.heads

        def split(y):
            return y.reshape(y.shape[0], y.shape[1], heads, -1).transpose(0, 2, 1, 3)

        found.append(numpy_attention(split(x @ wq.T + bq), split(x @ wk.T + bk), ~padding[:, None, None, :]))

    handles = [block.attention.register_forward_pre_hook(grab) for block in model.blocks]
    try:
        with torch.no_grad():
            model(ids, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


class TestHandAttnAdapter(AdapterConformance):
    adapter = HandAttnAdapter()

    def make_model(self):
        return make_model()

    def make_inputs(self, model):
        return make_inputs(model)

    def reference(self, model, inputs):
        return reference(model, inputs)


def test_the_entry_point_registers_it_and_capture_finds_it():
    assert "handattn" in list(attnflow.list_adapters())
    model = make_model()
    args, kwargs = make_inputs(model)
    trace = attnflow.capture(model, *args, **kwargs)
    assert trace.metadata["adapter"] == "handattn" and trace.num_layers == 3
    assert trace.mask.tolist()[1] == [True] * 5 + [False] * 2
    explanation = attnflow.explain(trace, ["rollout", "flow"], sources=[0])
    np.testing.assert_allclose(explanation["flow"].sum(-1), 1.0, atol=1e-9)

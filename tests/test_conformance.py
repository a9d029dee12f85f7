"""attnflow's own adapters pass attnflow.testing's conformance kit, like a third party's must."""

from __future__ import annotations

import attnflow
from attnflow.testing import AdapterConformance, models


def mha_reference(model, inputs):
    """Each nn.MultiheadAttention recomputed by torch's functional MHA on the inputs its layer gives it."""
    import torch

    found = []

    def grab(module, args, kwargs):
        q, k, v = args[:3]
        with torch.no_grad():
            _, weights = torch.nn.functional.multi_head_attention_forward(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), module.embed_dim, module.num_heads,
                module.in_proj_weight, module.in_proj_bias, None, None, False, 0.0, module.out_proj.weight,
                module.out_proj.bias, training=False, key_padding_mask=kwargs.get("key_padding_mask"),
                need_weights=True, attn_mask=kwargs.get("attn_mask"), average_attn_weights=False,
            )
        found.append(weights)

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True)
               for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    try:
        args, kwargs = inputs
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found


class TestTorchAdapter(AdapterConformance):
    adapter = attnflow.get_adapter("torch")

    def make_model(self):
        return models.torch_encoder()

    def make_inputs(self, model):
        return models.torch_encoder_inputs(model)

    def reference(self, model, inputs):
        return mha_reference(model, inputs)


class TestTransformersAdapter(AdapterConformance):
    adapter = attnflow.get_adapter("transformers")

    def make_model(self):
        return models.bert()

    def make_inputs(self, model):
        return models.text_inputs(model)


class TestTransformersEncoderDecoder(AdapterConformance):
    adapter = attnflow.get_adapter("transformers")

    def make_model(self):
        return models.t5()

    def make_inputs(self, model):
        return models.seq2seq_inputs(model)


class TestTimmAdapter(AdapterConformance):
    def make_model(self):
        from families import _timm_vit

        return _timm_vit().eval()

    @property
    def adapter(self):
        return attnflow.get_adapter("timm")

    def make_inputs(self, model):
        from families import _pixels

        return (_pixels(3),), {}

    def reference(self, model, inputs):
        from families import _timm_reference

        return _timm_reference(model, {"x": inputs[0][0]})


class TestLinenAdapter(AdapterConformance):
    adapter = attnflow.get_adapter("flax_linen")

    def make_model(self):
        from test_flax_linen import Model

        return Model()

    def make_inputs(self, model):
        import jax

        x = jax.random.normal(jax.random.key(1), (2, 6, 24))
        return (model.init(jax.random.key(0), x), x), {}

    def reference(self, model, inputs):
        from test_flax_linen import model_reference

        return model_reference(*inputs[0])[0]


class TestNNXAdapter(AdapterConformance):
    adapter = attnflow.get_adapter("flax_nnx")

    def make_model(self):
        from flax import nnx
        from test_flax_nnx import Model

        return Model(nnx.Rngs(0))

    def make_inputs(self, model):
        import jax

        return (jax.random.normal(jax.random.key(1), (2, 6, 24)),), {}

    def reference(self, model, inputs):
        from test_flax_nnx import model_reference

        return model_reference(model, inputs[0][0])[0]

"""Softmax-level capture with the generic torch adapter: ``modules=`` + ``layout=`` record the probabilities the
selected modules compute (their softmax, or the ``scaled_dot_product_attention`` they call); a module whose output
is the pattern (TransformerLens ``hook_pattern``) is taken as it is.

References are computed independently: a Hugging Face model's own eager ``output_attentions``, TransformerLens'
``run_with_cache`` patterns, or softmax(QKᵀ) by hand.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import attnflow

BATCH, SEQ, HEADS, D_HEAD, LAYERS = 2, 7, 3, 5, 2


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def no_modes_left() -> bool:
    return not torch.overrides._get_current_function_mode_stack()


@pytest.fixture(scope="module")
def gpt2():
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=13, n_positions=16, n_embd=HEADS * 4, n_layer=LAYERS, n_head=HEADS,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hf_attention_softmax_and_sdpa_equal_eager_weights(gpt2, implementation):
    ids = torch.randint(0, 13, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :2] = 0  # item 1 is left-padded
    gpt2.config._attn_implementation = "eager"
    with torch.no_grad():
        reference = [a.numpy() for a in gpt2(input_ids=ids, attention_mask=mask, output_attentions=True).attentions]
    gpt2.config._attn_implementation = implementation
    try:
        before = hook_count(gpt2)
        trace = attnflow.capture(gpt2, input_ids=ids, attention_mask=mask, adapter="torch",
                                 adapter_options={"modules": ["transformer.h.*.attn"], "layout": "bhqk"})
    finally:
        gpt2.config._attn_implementation = "eager"
    assert hook_count(gpt2) == before and no_modes_left()
    assert [layer.name for layer in trace.layers] == [f"transformer.h.{i}.attn" for i in range(LAYERS)]
    np.testing.assert_array_equal(trace.mask, mask.numpy().astype(bool))
    real = mask.numpy().astype(bool)
    for layer, ref in zip(trace.layers, reference):
        assert layer.weights.shape == (BATCH, HEADS, SEQ, SEQ)
        for b in range(BATCH):  # padded queries' rows are the model's business
            diff = np.abs(layer.weights[b][:, real[b]] - ref[b][:, real[b]]).max()
            assert diff <= 1e-6, (implementation, layer.name, diff)


class HandAttention(nn.Module):
    """Attention whose probabilities are laid out (batch, query, heads, key), returning only its output."""

    def __init__(self, width: int, heads: int, mode: str):
        super().__init__()
        self.heads, self.mode = heads, mode
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).unbind(2)  # (b, n, h, d)
        if self.mode == "bqhk":
            scores = torch.einsum("bqhd,bkhd->bqhk", q, k) / q.shape[-1] ** 0.5
            p = scores.softmax(dim=-1)
            return torch.einsum("bqhk,bkhd->bqhd", p, v).reshape(b, n, width)
        if self.mode == "two":  # two softmaxes in one call
            s = torch.einsum("bqhd,bkhd->bhqk", q, k)
            return (torch.softmax(s, -1) + torch.softmax(-s, -1)).sum() + x
        if self.mode == "none":
            return x * 2
        # "gqa": scaled_dot_product_attention with grouped key heads and causal masking
        kv = k[:, :, :1].transpose(1, 2), v[:, :, :1].transpose(1, 2)  # one key/value head
        out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), *kv, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2).reshape(b, n, width)

    def reference(self, x: torch.Tensor) -> np.ndarray:
        b, n, _ = x.shape
        q, k, _ = self.qkv(x).reshape(b, n, 3, self.heads, -1).unbind(2)
        if self.mode == "gqa":
            k = k[:, :, :1].expand_as(q)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        if self.mode == "gqa":
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1).detach().numpy()


class HandModel(nn.Module):
    def __init__(self, mode: str, width: int = HEADS * D_HEAD):
        super().__init__()
        self.embed = nn.Embedding(11, width)
        self.blocks = nn.ModuleList([HandAttention(width, HEADS, mode) for _ in range(LAYERS)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = x + block(x)
        return x

    def reference(self, ids: torch.Tensor) -> list[np.ndarray]:
        out, x = [], self.embed(ids)
        with torch.no_grad():
            for block in self.blocks:
                out.append(block.reference(x))
                x = x + block(x)
        return out


@pytest.mark.parametrize("mode,layout", [("bqhk", "bqhk"), ("gqa", "bhqk")])
def test_hand_written_layouts_and_sdpa_equal_by_hand(mode, layout):
    torch.manual_seed(2)
    model = HandModel(mode).eval()
    ids = torch.randint(0, 11, (BATCH, SEQ))
    trace = attnflow.capture(model, ids, adapter_options={"modules": [HandAttention], "layout": layout})
    reference = model.reference(ids)
    assert [layer.name for layer in trace.layers] == ["blocks.0", "blocks.1"]
    assert trace.tokens[0] == [str(int(t)) for t in ids[0]]  # positional token ids label the tokens
    for layer, ref in zip(trace.layers, reference):
        assert layer.weights.shape == (BATCH, HEADS, SEQ, SEQ)
        assert np.abs(layer.weights - ref).max() <= 1e-6
    assert trace.causal is (mode == "gqa")
    assert no_modes_left()


def test_errors_name_the_cause_and_leave_nothing_behind():
    ids = torch.randint(0, 11, (BATCH, SEQ))
    for mode, error, pattern in [
        ("two", attnflow.AdapterError, r"computed 2 attention probabilities .* select the modules that each compute one"),
        ("none", attnflow.HiddenAttentionError, r"computed no softmax over the key axis .* Select the module"),
    ]:
        model = HandModel(mode).eval()
        before = hook_count(model)
        with pytest.raises(error, match=pattern):
            attnflow.capture(model, ids, adapter_options={"modules": [HandAttention], "layout": "bhqk"})
        assert hook_count(model) == before and no_modes_left()
    model = HandModel("bqhk").eval()
    with pytest.raises(attnflow.OptionError, match="give both"):
        attnflow.capture(model, ids, adapter="torch", adapter_options={"layout": "bhqk"})
    with pytest.raises(attnflow.OptionError, match="not an axis order"):
        attnflow.capture(model, ids, adapter_options={"modules": [HandAttention], "layout": "bxqk"})
    # softmax over the wrong axis for the layout: named in the message
    with pytest.raises(attnflow.HiddenAttentionError, match=r"computed softmaxes of shapes \[\(2, 7, 3, 7\)"):
        attnflow.capture(model, ids, adapter_options={"modules": [HandAttention], "layout": "bkhq"})
    assert hook_count(model) == 0 and no_modes_left()
    # the forward raising inside a selected call: modes and hooks gone, the error is the model's
    def boom(*args):
        raise RuntimeError("boom")

    model.blocks[1].qkv.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        attnflow.capture(model, ids, adapter_options={"modules": [HandAttention], "layout": "bqhk"})
    assert hook_count(model) == 1 and no_modes_left()


def test_without_layout_a_module_returning_no_weights_points_to_layout():
    model = HandModel("bqhk").eval()
    with pytest.raises(attnflow.AdapterError, match=r"returned Tensor \(2, 7, 15\).*layout='bhqk'"):
        attnflow.capture(model, torch.randint(0, 11, (BATCH, SEQ)), adapter_options={"modules": [HandAttention]})


def test_transformers_adapter_advice_for_hidden_weights_works(gpt2):
    """An attention module that returns no weights even under eager: the transformers adapter's message names the
    softmax-level capture for that module (not "load with eager", which changes nothing), and that capture gives
    eager's own weights."""
    import ast
    import copy

    model = copy.deepcopy(gpt2)
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 13, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = [a.numpy() for a in model(input_ids=ids, output_attentions=True).attentions]
    for block in model.transformer.h:
        block.attn.forward = lambda *args, original=block.attn.forward, **kwargs: (original(*args, **kwargs)[0], None)
    with pytest.raises(attnflow.HiddenAttentionError, match=r"returned no attention weights under "
                       r"attn_implementation='eager'; its forward returns no weights even under eager") as caught:
        attnflow.capture(model, input_ids=ids)
    assert "Load the model with" not in str(caught.value)
    options = ast.literal_eval(str(caught.value).split("adapter_options=")[1].rstrip("."))  # the advice, as given
    assert options == {"modules": ["transformer.h.*.attn"], "layout": "bhqk"}
    trace = attnflow.capture(model, input_ids=ids, adapter="torch", adapter_options=options)
    for layer, ref in zip(trace.layers, reference, strict=True):
        assert np.abs(layer.weights - ref).max() <= 1e-6


@pytest.fixture(scope="module")
def lens():
    import transformer_lens  # noqa: F401  (installed by make test: a missing one fails)
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig(n_layers=LAYERS, n_heads=HEADS, d_head=D_HEAD, d_model=11, d_mlp=17, n_ctx=16,
                                     d_vocab=13, act_fn="gelu", attention_dir="causal", normalization_type="LN", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "use TransformerBridge": 3.x's HookedTransformer is kept
        return HookedTransformer(config).eval()


@pytest.mark.parametrize("options", [
    {"modules": ["blocks.*.attn.hook_pattern"]},                 # the output is the pattern
    {"modules": ["blocks.*.attn.hook_pattern"], "layout": "bhqk"},
    {"modules": ["blocks.*.attn"], "layout": "bhqk"},             # the softmax the attention computes
])
def test_transformer_lens_pattern_through_the_torch_adapter(lens, options):
    ids = torch.randint(0, 13, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = lens.run_with_cache(ids)
    trace = attnflow.capture(lens, ids, adapter="torch", adapter_options=options)
    assert len(trace.layers) == LAYERS and trace.causal
    for index, layer in enumerate(trace.layers):
        assert np.abs(layer.weights - cache["pattern", index].numpy()).max() <= 1e-7
    assert hook_count(lens) == 0 and no_modes_left()

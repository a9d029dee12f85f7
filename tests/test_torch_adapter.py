"""The generic PyTorch adapter on nn.TransformerEncoder, nn.MultiheadAttention and hand-written attention.

References call ``nn.MultiheadAttention`` directly with ``need_weights=True, average_attn_weights=False``
(or compute softmax(QK^T) by hand), layer by layer, outside any capture.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch
from torch import nn

import attnflow

TOL = 1e-6
BATCH, SEQ, D_MODEL, ENC_HEADS, ENC_LAYERS = 2, 7, 24, 4, 3


@contextlib.contextmanager
def fastpath(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def encoder_reference(encoder, src, padding, batch_first):
    """Per-layer (batch, heads, q, k) weights: run the layers one by one, asking each MHA directly."""
    weights = []
    x = src
    with torch.no_grad(), fastpath(False):
        for layer in encoder.layers:
            _, w = layer.self_attn(x, x, x, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
            weights.append(w.numpy())
            x = layer(x, src_key_padding_mask=padding)
    assert weights[0].shape == (BATCH, ENC_HEADS, SEQ, SEQ)
    return weights


def max_diff(trace, reference):
    assert len(trace.layers) == len(reference)
    return max(float(np.abs(layer.weights - ref).max()) for layer, ref in zip(trace.layers, reference))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_equals_direct_mha_calls(batch_first, tiny_encoder, sizes):
    assert (sizes.batch, sizes.seq, sizes.hidden) == (BATCH, SEQ, D_MODEL)
    encoder = tiny_encoder(batch_first=batch_first)
    torch.manual_seed(1)
    src = torch.randn(BATCH, SEQ, D_MODEL) if batch_first else torch.randn(SEQ, BATCH, D_MODEL)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[1, 5:] = True  # item 1 has 5 real tokens
    assert torch.backends.mha.get_fastpath_enabled()  # eval + no_grad: PyTorch's fused path would apply

    trace = attnflow.capture(encoder, src, src_key_padding_mask=padding)

    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert trace.metadata["adapter"] == "torch" and trace.framework == "torch"
    assert trace.layer_names == [f"layers.{i}.self_attn" for i in range(ENC_LAYERS)]
    assert all(layer.shape == (BATCH, ENC_HEADS, SEQ, SEQ) for layer in trace.layers)  # batch first either way
    np.testing.assert_array_equal(trace.mask, ~padding.numpy())  # from the key_padding_mask the MHA saw
    assert max_diff(trace, encoder_reference(encoder, src, padding, batch_first)) <= TOL
    assert trace.causal is False


def test_fastpath_setting_is_restored_when_it_was_off(tiny_encoder):
    encoder = tiny_encoder()
    with fastpath(False):
        attnflow.capture(encoder, torch.randn(BATCH, SEQ, D_MODEL))
        assert torch.backends.mha.get_fastpath_enabled() is False


def test_causal_encoder_is_detected(tiny_encoder):
    encoder = tiny_encoder()
    src = torch.randn(BATCH, SEQ, D_MODEL)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
    trace = attnflow.capture(encoder, src, mask=causal, is_causal=True)
    assert trace.causal is True
    with torch.no_grad(), fastpath(False):
        _, w = encoder.layers[0].self_attn(src, src, src, attn_mask=causal, need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(trace.layers[0].weights, w.numpy(), atol=TOL)


class SelfThenCross(nn.Module):
    """A self-attention MHA over x, then a cross-attention MHA from x to a memory of another length."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.self_attn = nn.MultiheadAttention(D_MODEL, 3, batch_first=batch_first)
        self.cross_attn = nn.MultiheadAttention(D_MODEL, 3, batch_first=batch_first)

    def forward(self, x, memory):
        h, _ = self.self_attn(x, x, x, need_weights=False)
        out, _ = self.cross_attn(h, memory, memory, need_weights=False)
        return out


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_and_cross_mha(batch_first):
    torch.manual_seed(0)
    model = SelfThenCross(batch_first).eval()
    shape = (BATCH, SEQ, D_MODEL) if batch_first else (SEQ, BATCH, D_MODEL)
    memory_shape = (BATCH, 5, D_MODEL) if batch_first else (5, BATCH, D_MODEL)
    x, memory = torch.randn(shape), torch.randn(memory_shape)
    trace = attnflow.capture(model, x, memory)
    assert [layer.kind for layer in trace.layers] == ["self", "cross"]
    assert trace.layers[0].shape == (BATCH, 3, SEQ, SEQ) and trace.layers[1].shape == (BATCH, 3, SEQ, 5)
    with torch.no_grad():
        h, w_self = model.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
        _, w_cross = model.cross_attn(h, memory, memory, need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(trace.layers[0].weights, w_self.numpy(), atol=TOL)
    np.testing.assert_allclose(trace.layers[1].weights, w_cross.numpy(), atol=TOL)


class Caller(nn.Module):
    """Returns what its MHA returns, as its caller asked for it."""

    def __init__(self, **call):
        super().__init__()
        self.call = call
        self.mha = nn.MultiheadAttention(D_MODEL, 3, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, **self.call)


@pytest.mark.parametrize(
    "call", [{}, {"need_weights": False}, {"average_attn_weights": True}, {"average_attn_weights": False}]
)
def test_caller_gets_what_it_asked_for(call):
    torch.manual_seed(0)
    model = Caller(**call).eval()
    x = torch.randn(BATCH, SEQ, D_MODEL)
    with torch.no_grad():
        expected_out, expected_w = model(x)
        with attnflow.attach(model) as recorder:
            out, w = model(x)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-6)
    if expected_w is None:
        assert w is None
    else:
        assert w.shape == expected_w.shape
        torch.testing.assert_close(w, expected_w, rtol=0, atol=1e-6)
    assert recorder.trace.layers[0].shape == (BATCH, 3, SEQ, SEQ)


def test_positional_need_weights_is_rewritten():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, 3).eval()
    x = torch.randn(SEQ, BATCH, D_MODEL)

    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, None, False)  # need_weights=False, positionally

    model = Positional()
    with attnflow.attach(model) as recorder, torch.no_grad():
        out = model(x)
    assert out[1] is None
    assert recorder.trace.layers[0].shape == (BATCH, 3, SEQ, SEQ)


def test_unbatched_input_gets_a_batch_axis():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, 3).eval()
    x = torch.randn(SEQ, D_MODEL)
    trace = attnflow.capture(mha, x, x, x)
    assert trace.layer_names == ["MultiheadAttention"]  # the root module itself
    with torch.no_grad():
        _, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    assert w.shape == (3, SEQ, SEQ)
    np.testing.assert_allclose(trace.layers[0].weights, w.numpy()[None], atol=TOL)


def test_bfloat16_is_upcast_and_labelled():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, 3, batch_first=True).eval().to(torch.bfloat16)
    x = torch.randn(BATCH, SEQ, D_MODEL, dtype=torch.bfloat16)
    trace = attnflow.capture(mha, x, x, x)
    layer = trace.layers[0]
    assert layer.weights.dtype == np.float32 and layer.source_dtype == "bfloat16"
    with torch.no_grad():
        _, w = mha(x, x, x, need_weights=True, average_attn_weights=False)
    np.testing.assert_array_equal(layer.weights, w.float().numpy())


# -- modules selected by class or by name ---------------------------------------------------------------


class HandAttention(nn.Module):
    """Single-projection attention returning (output, weights (batch, heads, q, k))."""

    def __init__(self, heads=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(b, s, d), w


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = HandAttention()
        self.mlp = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        x = x + self.attn(x)[0]
        return x + self.mlp(x)


class HandModel(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.embed = nn.Embedding(50, D_MODEL)
        self.blocks = nn.ModuleList([Block() for _ in range(layers)])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return x


def hand_reference(model, ids):
    weights, x = [], model.embed(ids)
    with torch.no_grad():
        for block in model.blocks:
            weights.append(block.attn(x)[1].numpy())
            x = block(x)
    return weights


@pytest.mark.parametrize(
    "modules", [[HandAttention], HandAttention, ["blocks.*.attn"], "blocks.*.attn", [re.compile(r"blocks\.\d+\.attn")]],
    ids=["class-list", "class", "glob-list", "glob", "regex"],
)
def test_modules_selected_by_class_or_name(modules):
    torch.manual_seed(0)
    model = HandModel().eval()
    ids = torch.randint(0, 50, (BATCH, SEQ))
    assert not attnflow.get_adapter("torch").claims(model)  # no MHA: only explicit selection captures it
    trace = attnflow.capture(model, ids, adapter="torch", adapter_options={"modules": modules})
    assert trace.layer_names == [f"blocks.{i}.attn" for i in range(4)]
    assert trace.tokens == [[str(int(t)) for t in row] for row in ids]  # ids from the integer input
    with torch.no_grad():
        reference = hand_reference(model, ids)
    assert max_diff(trace, reference) <= TOL


def test_tokenizer_like_labels_use_the_integer_input():
    class Vocab:
        def convert_ids_to_tokens(self, ids):
            return [f"w{i}" for i in ids]

    torch.manual_seed(0)
    model = HandModel(layers=2).eval()
    ids = torch.randint(0, 50, (BATCH, SEQ))
    trace = attnflow.capture(model, ids, adapter="torch", tokens=Vocab(), adapter_options={"modules": [HandAttention]})
    assert trace.tokens[1] == [f"w{int(i)}" for i in ids[1]]


def test_shared_module_run_twice_is_named_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = HandAttention()

        def forward(self, x):
            return self.attn(self.attn(x)[0])[0]

    trace = attnflow.capture(Twice().eval(), torch.randn(BATCH, SEQ, D_MODEL), adapter_options={"modules": [HandAttention]}, adapter="torch")
    assert trace.layer_names == ["attn.0", "attn.1"]  # numbered by layer: the module runs as layers 0 and 1


def test_selection_errors():
    model = HandModel().eval()
    ids = torch.randint(0, 50, (BATCH, SEQ))
    with pytest.raises(attnflow.AdapterError, match=r"no module of HandModel matches.*blocks\.0\.attn"):
        attnflow.capture(model, ids, adapter="torch", adapter_options={"modules": ["decoder.*"]})
    with pytest.raises(attnflow.AdapterError, match="contains no torch.nn.MultiheadAttention"):
        attnflow.capture(model, ids, adapter="torch")
    with pytest.raises(attnflow.OptionError, match="modules="):
        attnflow.capture(model, ids, adapter="torch", adapter_options={"modules": [42]})
    with pytest.raises(attnflow.OptionError, match="unknown option"):
        attnflow.capture(model, ids, adapter="torch", adapter_options={"module": ["blocks.*.attn"]})
    with pytest.raises(attnflow.AdapterError, match=r"returned \(2, 7, 24\).*\(batch, heads, query, key\)"):
        attnflow.capture(model, ids, adapter="torch", adapter_options={"modules": ["blocks.*.attn"], "output_index": 0})
    with pytest.raises(attnflow.AdapterError, match="no attention weights at output_index=1"):
        attnflow.capture(model, ids, adapter="torch", adapter_options={"modules": ["blocks.*.mlp"]})


def test_model_without_attention_lists_adapters():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(attnflow.AdapterError, match="No adapter recognises") as info:
        attnflow.capture(mlp, torch.randn(3, 4))
    message = str(info.value)
    assert "torch (torch)" in message and "transformers (transformers)" in message
    assert "register_adapter" in message


def test_training_mode_dropout_asks_for_eval(tiny_encoder):
    encoder = tiny_encoder().train()  # dropout 0.1 rescales the attention rows
    with pytest.raises(attnflow.AdapterError, match=r"model\.eval\(\)"):
        attnflow.capture(encoder, torch.randn(BATCH, SEQ, D_MODEL))


# -- restoration ----------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def test_forward_that_raises_inside_attach_restores_everything(tiny_encoder, hooks_of):
    encoder = tiny_encoder()
    src = torch.randn(BATCH, SEQ, D_MODEL)

    def explode(module, args, kwargs):
        raise Boom("layer 2 failed")

    bomb = encoder.layers[2].register_forward_pre_hook(explode, with_kwargs=True)  # after two attention layers
    before = hooks_of(encoder)
    assert sum(map(len, before.values())) == 2  # only the bomb (a pre-hook with kwargs: two entries)
    with pytest.raises(Boom):
        with attnflow.attach(encoder) as recorder, torch.no_grad():
            assert torch.backends.mha.get_fastpath_enabled() is False
            encoder(src)
    assert hooks_of(encoder) == before
    assert torch.backends.mha.get_fastpath_enabled() is True
    assert recorder.traces == []
    bomb.remove()

    trace = attnflow.capture(encoder, src)
    assert trace.num_layers == ENC_LAYERS
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    assert max_diff(trace, encoder_reference(encoder, src, padding, True)) <= TOL


def test_mha_that_raises_mid_call_does_not_corrupt_later_calls():
    torch.manual_seed(0)
    model = Caller(need_weights=False).eval()
    with attnflow.attach(model) as recorder, torch.no_grad():
        with pytest.raises(AssertionError):
            model(torch.randn(BATCH, SEQ, D_MODEL + 1))  # wrong width: MHA raises
        out, w = model(torch.randn(BATCH, SEQ, D_MODEL))
    assert w is None  # the caller's request (not the failed call's) was honoured
    assert len(recorder.traces) == 1


def test_hooks_are_removed_after_a_normal_exit(tiny_encoder, hooks_of):
    encoder = tiny_encoder()
    before = hooks_of(encoder)
    with attnflow.attach(encoder):
        assert hooks_of(encoder) != before
    assert hooks_of(encoder) == before


def test_claims():
    adapter = attnflow.get_adapter("torch")
    assert adapter.claims(nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, 4), 1, enable_nested_tensor=False))
    assert adapter.claims(nn.MultiheadAttention(D_MODEL, 3))
    assert not adapter.claims(nn.Linear(2, 2))
    assert not adapter.claims(object())


class SeqFirst(nn.Module):
    """Takes (seq, batch) token ids, as batch_first=False PyTorch models do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, D_MODEL)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D_MODEL, 4, 20), 2, enable_nested_tensor=False)

    def forward(self, ids):
        return self.encoder(self.embed(ids))


def test_sequence_first_ids_label_the_right_batch_items():
    torch.manual_seed(0)
    model = SeqFirst().eval()
    ids = torch.randint(0, 50, (SEQ, BATCH))
    trace = attnflow.capture(model, ids)
    assert trace.layers[0].shape == (BATCH, 4, SEQ, SEQ)
    assert trace.tokens == [[str(int(t)) for t in ids[:, b]] for b in range(BATCH)]


# -- nested attaches ---------------------------------------------------------------------------------------


def test_nested_attach_on_a_transformer_encoder_gives_both_recorders_the_trace(tiny_encoder):
    encoder = tiny_encoder()
    src = torch.randn(2, 7, 24)
    with torch.no_grad():
        plain = encoder(src)
        with attnflow.attach(encoder) as single:
            expected = encoder(src)
        with attnflow.attach(encoder) as outer:
            with attnflow.attach(encoder) as inner:
                output = encoder(src)
        assert torch.equal(encoder(src), plain)
    assert torch.equal(output, expected)  # the caller (TransformerEncoderLayer) got what it asked for
    alone = single.trace
    for recorder in (outer, inner):
        trace = recorder.trace
        assert [layer.name for layer in trace.layers] == [layer.name for layer in alone.layers]
        for layer, reference in zip(trace.layers, alone.layers):
            assert (layer.weights == reference.weights).all()


def test_nested_attach_gives_the_caller_what_it_asked_for():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(24, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        _, averaged = mha(x, x, x)  # default: need_weights=True, averaged over heads
        with attnflow.attach(mha) as outer, attnflow.attach(mha) as inner:
            _, none = mha(x, x, x, need_weights=False)
            _, got = mha(x, x, x)
    assert none is None and got.shape == averaged.shape and torch.allclose(got, averaged, atol=1e-6)
    assert len(outer.traces) == len(inner.traces) == 2


def test_modules_option_finds_the_torch_adapter_without_naming_it():
    torch.manual_seed(0)
    model = HandModel(layers=2).eval()
    ids = torch.randint(0, 50, (BATCH, SEQ))
    trace = attnflow.capture(model, ids, adapter_options={"modules": [HandAttention]})
    assert trace.metadata["adapter"] == "torch" and trace.num_layers == 2
    with attnflow.attach(model, modules=["blocks.*.attn"]) as rec:
        model(ids)
    assert rec.trace.layer_names == ["blocks.0.attn", "blocks.1.attn"]
    with pytest.raises(attnflow.OptionError, match=r"option 'output_index' must be int"):
        attnflow.capture(model, ids, adapter_options={"modules": [HandAttention], "output_index": "1"})

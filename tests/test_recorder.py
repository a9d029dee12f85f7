"""The Recorder adapters fill: pass buffering, the one naming rule, streams, labels, links."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow
from attnflow import AdapterError, Recorder

BATCH, HEADS = 2, 3


def attention(rng, q, k, key_mask=None, causal=False):
    logits = rng.standard_normal((BATCH, HEADS, q, k))
    allowed = np.ones((BATCH, HEADS, q, k), bool)
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones((q, k), bool))
    w = np.where(allowed, np.exp(logits), 0.0)
    return w / w.sum(-1, keepdims=True)


class Tokenizer:
    """Stands in for a tokenizer: the two methods the recorder uses, with a fixed vocabulary."""

    all_special_ids = [0, 1]

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def test_single_stream_pass_with_labels_and_special_tokens():
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ids = np.array([[0, 5, 6, 7, 1], [0, 8, 1, 3, 3]])
    rec = Recorder(framework="numpy", tokens=Tokenizer(), adapter="test")
    rec.start_call(mask=mask, input_ids=ids)
    rec.start_call()  # a nested call of the root joins the pass
    for i in range(3):
        rec.record(f"layer.{i}", attention(rng, 5, 5, mask.astype(bool)))
    rec.end_call()
    assert rec.in_call and not rec.traces[:0]
    rec.end_call()
    trace = rec.trace
    assert trace.tokens[1] == ["t0", "t8", "t1", "t3", "t3"] and trace.mask.tolist() == mask.astype(bool).tolist()
    assert trace.special.tolist() == [[True, False, False, False, True], [True, False, True, False, False]]
    assert trace.metadata["adapter"] == "test" and len(rec.traces) == 1


def test_a_tokenizer_with_only_decode_labels_each_token():
    """SentencePiece-style tokenizers (gemma's, tiktoken) have ``decode`` and no ``convert_ids_to_tokens``:
    each id is labelled by its decoded text, ``<id>`` where that is empty (whitespace and control tokens)."""
    vocabulary = {0: "", 3: "the", 4: "", 9: " keys", 12: "on"}

    class Decoder:
        def decode(self, ids):
            return "".join(vocabulary[i] for i in ids).lstrip()  # as SentencePiece: no leading space

    rng = np.random.default_rng(2)
    ids = np.array([[3, 4, 9, 12], [12, 3, 0, 0]])
    rec = Recorder(framework="numpy", tokens=Decoder())
    rec.start_call(mask=ids != 0, input_ids=ids)
    rec.record("layer", attention(rng, 4, 4, ids != 0))
    rec.end_call()
    assert rec.trace.tokens == [["the", "<4>", "keys", "on"], ["on", "the", "<0>", "<0>"]]


def test_repeated_paths_are_numbered_by_layer():
    rng = np.random.default_rng(1)
    rec = Recorder(framework="jax")
    rec.start_call()
    for _ in range(3):
        rec.record("model/layers/attn", attention(rng, 4, 4), repeat_prefix="model/layers")
    rec.record("shared.attn", attention(rng, 4, 4))
    rec.record("shared.attn", attention(rng, 4, 4))
    rec.record("final", attention(rng, 4, 4))
    rec.end_call()
    assert rec.trace.layer_names == [
        "model/layers/0/attn", "model/layers/1/attn", "model/layers/2/attn", "shared.attn.0", "shared.attn.1", "final",
    ]
    # a scanned model and an unrolled one pair by names
    unrolled = attnflow.AttentionTrace.from_arrays(
        [layer.weights for layer in rec.trace.layers[:3]], names=[f"model/layers_{i}/attn" for i in range(3)]
    )
    scanned = attnflow.AttentionTrace.from_arrays(
        [layer.weights for layer in rec.trace.layers[:3]], names=rec.trace.layer_names[:3]
    )
    assert attnflow.compare(unrolled, scanned, align="names", flow=False).ok


def test_streams_cross_layers_and_described_inputs():
    rng = np.random.default_rng(2)
    enc_mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    rec = Recorder(framework="torch", tokens={"encoder": Tokenizer(), "decoder": [["<s>", "a", "b"]] * BATCH})
    rec.start_call(streams={"encoder": {"input_ids": np.full((BATCH, 6), 4)}})
    rec.describe_stream("encoder", mask=enc_mask)
    rec.describe_stream("encoder", mask=np.ones((BATCH, 6)))  # known values are kept
    rec.record("enc.0", attention(rng, 6, 6, enc_mask), query_stream="encoder")
    rec.record("dec.0.self", attention(rng, 3, 3, causal=True), query_stream="decoder")
    rec.record("dec.0.cross", attention(rng, 3, 6, enc_mask), query_stream="decoder", key_stream="encoder")
    rec.end_call()
    trace = rec.trace
    assert list(trace.streams) == ["encoder", "decoder"] and trace.layers[2].kind == "cross"
    assert trace.streams["encoder"].mask.tolist() == enc_mask.tolist()
    assert trace.streams["encoder"].tokens[0][0] == "t4"
    assert trace.streams["decoder"].tokens == (("<s>", "a", "b"),) * BATCH and trace.streams["decoder"].causal
    assert set(attnflow.rollout(trace)) == {"encoder", "decoder"}


def test_cross_layers_without_streams_attend_to_memory():
    rng = np.random.default_rng(3)
    rec = Recorder(framework="torch")
    rec.start_call(mask=np.ones((BATCH, 4)))
    rec.describe_stream("memory", mask=np.array([[1] * 5, [1, 1, 1, 0, 0]]))
    rec.record("h.0.attn", attention(rng, 4, 4))
    rec.record("h.0.cross", attention(rng, 4, 5, np.array([[1] * 5, [1, 1, 1, 0, 0]], bool)), kind="cross")
    rec.end_call()
    trace = rec.trace
    assert list(trace.streams) == ["tokens", "memory"] and trace.streams["memory"].lengths().tolist() == [5, 3]


def test_links_reach_the_trace():
    rng = np.random.default_rng(4)
    rec = Recorder(framework="torch")
    rec.start_call()
    rec.record("vision.0", attention(rng, 3, 3), query_stream="vision")
    link = np.zeros((BATCH, 4, 3))
    link[:, 1, 2] = 1.0
    rec.link("text", "vision", 1, link)
    rec.record("text.0", attention(rng, 4, 4, causal=True), query_stream="text")
    rec.end_call()
    assert rec.trace.links[0].depth == 1 and rec.trace.default_stream() == "text"


def test_aborted_pass_leaves_nothing_and_empty_pass_is_an_error():
    rng = np.random.default_rng(5)
    rec = Recorder(framework="torch", adapter="mine")
    rec.start_call()
    rec.record("a", attention(rng, 3, 3))
    rec.abort_call()
    assert rec.traces == [] and not rec.in_call
    rec.start_call()
    with pytest.raises(AdapterError, match="adapter 'mine' recorded no attention"):
        rec.end_call()
    with pytest.raises(AdapterError, match="No forward pass ran"):
        _ = rec.trace


def test_training_mode_error_says_eval():
    rng = np.random.default_rng(6)
    rec = Recorder(framework="torch")
    rec.start_call()
    rec.record("a", attention(rng, 3, 3) * 1.1, training=True)
    with pytest.raises(AdapterError, match=r"model.eval\(\)"):
        rec.end_call()


def test_unknown_stream_fields_are_refused():
    rec = Recorder(framework="torch")
    rec.start_call()
    with pytest.raises(TypeError, match="unknown fields"):
        rec.describe_stream("text", colour="red")


def test_captured_weights_are_kept_without_a_copy_only_when_nothing_else_holds_them(tiny_hf, sizes):
    """The model drops its attention tensors by the end of the pass: the trace keeps their memory (read-only)
    instead of copying it. Tensors the caller still holds (output_attentions=True) are copied: changing them
    afterwards leaves the trace as captured."""
    import torch
    from attnflow.adapters._torch._torch_common import claim

    from attnflow.trace._arrays import frozen

    model = tiny_hf("bert", "eager")
    ids = torch.randint(2, sizes.vocab, (sizes.batch, sizes.seq), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = [t.numpy().copy() for t in model(input_ids=ids, output_attentions=True).attentions]
    trace = attnflow.capture(model, input_ids=ids)
    for layer, want in zip(trace.layers, expected, strict=True):
        np.testing.assert_array_equal(layer.weights, want)
        assert isinstance(layer.weights.base, torch.Tensor) and not layer.weights.flags.writeable
    with attnflow.attach(model) as rec, torch.no_grad():
        held = model(input_ids=ids, output_attentions=True).attentions
    for tensor in held:
        tensor.mul_(0.5)
    for layer, want in zip(rec.trace.layers, expected, strict=True):
        np.testing.assert_array_equal(layer.weights, want)

    probabilities = torch.softmax(torch.randn(BATCH, HEADS, 4, 6), dim=-1)
    array = probabilities.numpy()
    claim(array)  # the tensor is still alive: copied
    assert frozen(array) is not array
    view = probabilities[0]
    del probabilities
    claim(array)  # a view still shares the storage: copied
    assert frozen(array) is not array
    del view
    claim(array)  # nothing else can reach it: kept
    assert frozen(array) is array and not array.flags.writeable


def test_weights_in_memory_torch_did_not_allocate_are_copied():
    """A module that writes its probabilities into a workspace it owns (a numpy buffer seen through
    torch.from_numpy) and rewrites it on the next call: the trace copies them, so a later pass leaves it as
    captured."""
    import torch

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.workspace = np.zeros(64, np.float32)

        def forward(self, x):
            n = x.shape[1]
            weights = torch.from_numpy(self.workspace[: n * n]).view(1, 1, n, n)
            weights.copy_(torch.softmax((x @ x.transpose(1, 2))[:, None], -1))
            return (weights @ x[:, None])[:, 0], weights

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

        def forward(self, x):
            return self.attention(x)[0]

    model, options = Model(), {"modules": [Attention]}
    with torch.no_grad():
        first = attnflow.capture(model, torch.randn(1, 5, 3), adapter_options=options)
        captured = first.layers[0].weights.copy()
        attnflow.capture(model, 5 * torch.randn(1, 5, 3), adapter_options=options)
    np.testing.assert_array_equal(first.layers[0].weights, captured)

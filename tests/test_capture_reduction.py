"""capture(..., head_fusion=, dtype=): heads fused and weights converted in the hook, for long inputs.

The reference is the model's own eager attention (``output_attentions=True``), fused and rounded here
with numpy and ml_dtypes. Sizes: batch 2, tokens 9 (item 1 right-padded to 6), heads 4 over 2 KV heads,
head size 6, layers 3, vocabulary 29.
"""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import attnflow
from attnflow import OptionError

BATCH, TOKENS, LAYERS = 2, 9, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=29, hidden_size=24, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=11, max_position_embeddings=40,
    )).eval()


@pytest.fixture(scope="module")
def inputs():
    ids = torch.randint(0, 29, (BATCH, TOKENS), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def eager(model, inputs):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        return [a.numpy() for a in reference(**inputs, output_attentions=True).attentions]


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_fused_in_the_hook_equals_fusing_the_models_attention(model, inputs, eager, fusion):
    trace = attnflow.capture(model, head_fusion=fusion, **inputs)
    assert trace.metadata["head_fusion"] == fusion
    for layer, reference in zip(trace.layers, eager, strict=True):
        assert layer.weights.shape == (BATCH, 1, TOKENS, TOKENS)
        np.testing.assert_allclose(layer.weights[:, 0], getattr(reference, fusion)(axis=1), atol=1e-7)
    full = attnflow.capture(model, **inputs)
    # rollout and flow follow the capture's fusion, and give what fusing afterwards gives
    np.testing.assert_allclose(attnflow.rollout(trace), attnflow.rollout(full, head_fusion=fusion), atol=1e-6)
    np.testing.assert_allclose(attnflow.flow(trace, sources=[-1]), attnflow.flow(full, sources=[-1], head_fusion=fusion),
                               atol=1e-6)
    np.testing.assert_allclose(attnflow.raw(trace), attnflow.raw(full, head_fusion=fusion), atol=1e-7)
    assert attnflow.explain(trace, ["raw", "rollout", "flow"], sources=[0])["rollout"].shape == (BATCH, 1, TOKENS)
    other = "mean" if fusion != "mean" else "max"
    with pytest.raises(OptionError, match=f"captured with head_fusion='{fusion}'.*{other}"):
        attnflow.rollout(trace, head_fusion=other)
    with pytest.raises(OptionError, match="heads= selects heads"):
        attnflow.rollout(trace, heads=[0])


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_storage_dtype(model, inputs, eager, dtype, tmp_path):
    trace = attnflow.capture(model, head_fusion="max", dtype=dtype, **inputs)
    stored = np.float32 if dtype == "bfloat16" else np.dtype(dtype)
    expected_rounding = {"float16": np.float16, "float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    for layer, reference in zip(trace.layers, eager, strict=True):
        assert layer.weights.dtype == stored
        expected = reference.max(axis=1).astype(expected_rounding).astype(np.float32)
        np.testing.assert_array_equal(layer.weights[:, 0].astype(np.float32), expected)
    assert trace.layers[0].source_dtype == ("bfloat16" if dtype == "bfloat16" else dtype)
    itemsize = 2 if dtype == "float16" else 4
    assert sum(layer.weights.nbytes for layer in trace.layers) == LAYERS * BATCH * TOKENS * TOKENS * itemsize
    trace.save(tmp_path / "fused.safetensors")  # rows of a max-fused map do not sum to 1: it loads all the same
    loaded = attnflow.load(tmp_path / "fused.safetensors")
    assert loaded.metadata["head_fusion"] == "max"
    np.testing.assert_array_equal(attnflow.rollout(loaded), attnflow.rollout(trace))


def test_methods_that_need_every_head_are_refused(model, inputs):
    with pytest.raises(OptionError, match="head_fusion='mean' keeps one fused map.*without head_fusion"):
        attnflow.capture(model, head_fusion="mean", target=3, **inputs)
    with pytest.raises(OptionError, match="without head_fusion"):
        attnflow.capture(model, head_fusion="max", values=True, **inputs)
    with pytest.raises(OptionError, match="head_fusion must be"):
        attnflow.capture(model, head_fusion="median", **inputs)
    with pytest.raises(OptionError, match="dtype must be one of"):
        attnflow.capture(model, dtype="int8", **inputs)


def test_fusion_also_where_the_adapter_leaves_it_to_the_recorder():
    """The plain torch adapter and any third-party adapter: the recorder fuses what it is handed."""
    torch.manual_seed(1)
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(20, 5, dim_feedforward=13, batch_first=True), 2, enable_nested_tensor=False,
    ).eval()
    x = torch.randn(3, 7, 20)
    full = attnflow.capture(encoder, x)
    fused = attnflow.capture(encoder, x, head_fusion="min", dtype="float16")
    for a, b in zip(full.layers, fused.layers, strict=True):
        np.testing.assert_array_equal(b.weights[:, 0], a.weights.min(axis=1).astype(np.float16))
    from attnflow.recording import CaptureRequest

    recorder = attnflow.Recorder(framework="numpy", request=CaptureRequest(head_fusion="mean"))
    recorder.start_call()
    recorder.record("layer", full.layers[0].weights)
    recorder.end_call()
    np.testing.assert_allclose(recorder.trace.layers[0].weights[:, 0], full.layers[0].weights.mean(axis=1), atol=1e-7)

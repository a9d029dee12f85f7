"""examples/flax_bert.py, the Flax NNX port of BERT, against transformers' BertModel: a tiny random model
saved with save_pretrained (the real loading path) and the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import attnflow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def flax_bert():
    name = "flax_bert"  # the example is a plain file, not a package: load it by path
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "flax_bert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def torch_reference(model, inputs):
    import torch

    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    return out.last_hidden_state.numpy(), [a.numpy() for a in out.attentions]


def test_tiny_random_bert_matches_transformers(tmp_path, flax_bert, tiny_hf, hf_inputs, sizes):
    torch_model = tiny_hf("bert", "eager")
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    port = flax_bert.load_bert(tmp_path)
    inputs = hf_inputs("right")
    hidden, attentions = torch_reference(torch_model, inputs)
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    valid = mask.astype(bool)

    jax_hidden = np.asarray(port(ids, mask))
    assert jax_hidden.shape == (sizes.batch, sizes.seq, sizes.hidden)
    np.testing.assert_allclose(jax_hidden[valid], hidden[valid], atol=1e-5)

    trace = attnflow.capture(port, ids, mask)
    assert trace.layer_names == [f"encoder/layer/{i}/attention" for i in range(sizes.layers["bert"])]
    np.testing.assert_array_equal(trace.mask, valid)
    assert trace.tokens[0] == [str(int(t)) for t in ids[0]]
    for layer, expected in zip(trace.layers, attentions, strict=True):
        assert layer.weights.shape == (sizes.batch, sizes.heads, sizes.seq, sizes.seq)
        np.testing.assert_allclose(layer.weights, expected, atol=1e-5)
    assert max(float(np.abs(w).max()) for w in attentions) > 0.5  # peaked maps, not a uniform trivial case


def test_tiny_bert_traces_compare_equal_through_both_adapters(tmp_path, flax_bert, tiny_hf, hf_inputs):
    torch_model = tiny_hf("bert")  # transformers' default attention; its adapter switches to eager
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    port = flax_bert.load_bert(tmp_path)
    inputs = hf_inputs("right")
    torch_trace = attnflow.capture(torch_model, **inputs)
    jax_trace = attnflow.capture(port, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())
    report = attnflow.compare(torch_trace, jax_trace)
    assert report.ok, str(report)
    assert report.attention_max_abs < 1e-5 and report.flow_max_abs < 1e-5


@pytest.mark.slow
def test_minilm_port_matches_transformers(flax_bert, minilm_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(["The keys to the cabinet are on the table.", "Hello there."], padding=True, return_tensors="np")
    torch_model = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    hidden, attentions = torch_reference(torch_model, {k: torch.from_numpy(v) for k, v in batch.items()})
    port = flax_bert.load_bert(minilm_dir)
    valid = batch["attention_mask"].astype(bool)
    assert not valid.all()  # the batch is padded

    with attnflow.attach(port, tokens=tokenizer) as rec:
        jax_hidden = np.asarray(port(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
    np.testing.assert_allclose(jax_hidden[valid], hidden[valid], atol=1e-5)
    trace = rec.trace
    assert trace.num_layers == 6 and trace.num_heads == (12,) * 6
    assert trace.tokens[0][:3] == ["[CLS]", "the", "keys"]
    for layer, expected in zip(trace.layers, attentions, strict=True):
        np.testing.assert_allclose(layer.weights, expected, atol=1e-5)

    torch_trace = attnflow.capture(torch_model, tokens=tokenizer, **{k: torch.from_numpy(v) for k, v in batch.items()})
    report = attnflow.compare(torch_trace, trace)
    assert report.ok, str(report)
    assert report.rollout_max_abs < 1e-5 and report.flow_max_abs < 1e-5


def test_loader_reports_a_missing_tensor(tmp_path, flax_bert, tiny_hf):
    from safetensors.numpy import load_file, save_file

    tiny_hf("bert", "eager").save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["encoder.layer.2.attention.self.key.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"encoder\.layer\.2\.attention\.self\.key\.weight"):
        flax_bert.load_bert(tmp_path)

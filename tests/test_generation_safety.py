"""generate() and forward passes under attach change nothing the caller sees (issue 21, point 6).

GPT-Neo's local layers slice their own causal table by the key length, so under a static cache they attend
to unwritten cache slots: attach refuses such a call before generate() runs. A generation whose trace
cannot be built after it ran keeps its output on the error. Output objects inside and outside attach have
the same class, keys, attributes and tensors. Tiny models: vocabulary 29, width 24, heads 4, layers 2 or 3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from attnflow.adapters._torch import _generation_torch

import attnflow

PROMPT, NEW = 7, 6


def gpt_neo():
    torch.manual_seed(0)
    return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        vocab_size=29, hidden_size=24, num_layers=2, attention_types=[[["global", "local"], 1]], num_heads=4,
        window_size=3, max_position_embeddings=40, intermediate_size=11, eos_token_id=5, pad_token_id=0,
        bos_token_id=1, attn_implementation="eager",
    )).eval()


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=29, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=11, max_position_embeddings=40, eos_token_id=5, pad_token_id=0, bos_token_id=1,
        attn_implementation="eager",
    )).eval()


def prompt():
    ids = torch.randint(6, 29, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def test_gpt_neo_static_cache_is_refused_before_generate_runs():
    model = gpt_neo()
    ids, mask = prompt()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        with attnflow.attach(model) as rec:
            with pytest.raises(attnflow.OptionError, match="before it runs.*unwritten cache slots.*dynamic cache"):
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static")
            assert calls == [] and rec.traces == []
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW)  # the dynamic cache works
            assert len(rec.traces) == 1
    finally:
        handle.remove()
    with attnflow.attach(model, generation="rerun") as rec:  # a re-run records no step: nothing to refuse
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static")
    assert len(rec.traces) == 1


def test_a_trace_that_fails_after_generate_keeps_the_generated_ids(monkeypatch):
    model = gpt_neo()
    ids, mask = prompt()
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static")
    monkeypatch.setattr(_generation_torch, "_self_masked_local_layers", lambda model: [])  # the check missed it
    with attnflow.attach(model) as rec, pytest.raises(attnflow.AdapterError, match="unwritten cache slots") as caught:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, cache_implementation="static")
    assert torch.equal(caught.value.sequences, expected) and torch.equal(caught.value.output, expected)
    assert ".sequences" in str(caught.value) and rec.traces == [] and not rec.in_call


def same(a, b):
    """Same class, same keys/fields and attributes, equal tensors (recursively)."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for key in a:
            same(a[key], b[key])
        for name in getattr(a, "__dataclass_fields__", {}):
            same(getattr(a, name), getattr(b, name))
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, (int, float, str, bool, type(None))):
        assert a == b


@pytest.mark.parametrize("build", [gpt_neo, llama], ids=["gpt-neo", "llama"])
@pytest.mark.parametrize("return_dict", [True, False], ids=["output", "tuple"])
def test_forward_outputs_are_identical_inside_attach(build, return_dict):
    model = build()
    ids, mask = prompt()
    with torch.no_grad():
        outside = model(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=return_dict)
        with attnflow.attach(model) as rec:
            inside = model(input_ids=ids, attention_mask=mask, use_cache=False, return_dict=return_dict)
    same(outside, inside)
    if return_dict:
        assert "attentions" not in inside.keys() and inside.attentions is None
    assert len(rec.trace.layers) == model.config.num_hidden_layers
    with torch.no_grad(), attnflow.attach(model):  # asked for by the caller: kept
        asked = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(asked.attentions) == model.config.num_hidden_layers


@pytest.mark.parametrize("build", [gpt_neo, llama], ids=["gpt-neo", "llama"])
def test_generate_outputs_are_identical_inside_attach(build):
    model = build()
    ids, mask = prompt()
    settings = {"max_new_tokens": NEW, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    outside = model.generate(input_ids=ids, attention_mask=mask, **settings)
    with attnflow.attach(model) as rec:
        inside = model.generate(input_ids=ids, attention_mask=mask, **settings)
    same(outside, inside)
    assert inside.attentions is None and len(rec.traces) == 1
    np.testing.assert_array_equal(rec.trace.metadata["generation"]["generated_ids"], outside.sequences[:, PROMPT:].numpy())

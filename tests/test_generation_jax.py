"""Generation with a key-value cache in JAX under attach(): one stitched trace, equal to a teacher-forced pass.

penzai: the model is penzai's own conversion of a tiny random Hugging Face GPT-NeoX (``examples/
compare_hf_penzai.py``: 2 layers, 4 heads, width 48, vocabulary 97), turned into penzai's sampler
(``KVCachingTransformerLM.from_uncached``, a static cache of 11 slots, ``pz.nn.KVCachingAttention``). Batch 3,
prompt 5 (item 1 left-padded by 2 with penzai's ``pad_id`` 0), 4 new tokens: the stitched trace covers 8
positions. The reference is penzai's own attention probabilities, read by a layer written here that is put after
each attention's ``query_key_to_attn`` of the uncached model, run without attnflow over the finished sequences
but their last token, with the positions the sampler gives (the count of real tokens before each, -1 for
padding). The Hugging Face model and its conversion generate greedily from the same prompt: the generated ids
must be equal (a difference fails), then their stitched traces are compared.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop

import attnflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import compare_hf_penzai as example  # noqa: E402

BATCH, PROMPT, NEW, CACHE = 3, 5, 4, 11
LENGTH = PROMPT + NEW - 1


def _prompt() -> np.ndarray:
    ids = np.random.default_rng(3).integers(1, example.VOCAB, (BATCH, PROMPT))
    ids[1, :2] = 0  # left padding (penzai's pad_id)
    return ids


def _named(array: np.ndarray) -> pz.nx.NamedArray:
    return pz.nx.wrap(jnp.asarray(array)).tag("batch", "seq")


@pz.pytree_dataclass
class _Keep(pz.nn.Layer):
    """Stores the attention probabilities it passes through (batch, heads, query, key) in ``_KEPT``."""

    def __call__(self, x, **side_inputs):
        _KEPT.append(x.untag("batch", "heads", "seq", "kv_seq").unwrap())
        return x


_KEPT: list[np.ndarray] = []


def penzai_reference(model: pz.nn.Layer, sequences: np.ndarray) -> list[np.ndarray]:
    """penzai's own probabilities of each attention layer over ``sequences`` (no attnflow), with the sampler's
    positions: the number of real (non-0) tokens before each token, -1 for padding."""
    kept = pz.select(model).at_instances_of(pz.nn.Attention).apply(
        lambda attention: dataclasses.replace(
            attention, query_key_to_attn=pz.nn.Sequential([attention.query_key_to_attn, _Keep()])))
    real = sequences != 0
    positions = np.where(real, np.cumsum(real, axis=1) - 1, -1)

    def run(tokens, token_positions):  # compiled once (eager penzai would compile each operation)
        _KEPT.clear()
        kept(pz.nx.wrap(tokens).tag("batch", "seq"), token_positions=pz.nx.wrap(token_positions).tag("batch", "seq"))
        out, _KEPT[:] = list(_KEPT), []
        return out

    return [np.asarray(p, np.float64) for p in jax.jit(run)(jnp.asarray(sequences), jnp.asarray(positions))]


def assert_same_real(weights: np.ndarray, reference: np.ndarray, mask: np.ndarray, atol: float) -> None:
    """Equal on every real query row over the real keys; nothing on padding keys."""
    for b in range(mask.shape[0]):
        real = mask[b]
        np.testing.assert_allclose(weights[b][:, real][:, :, real], reference[b][:, real][:, :, real], atol=atol)
        assert np.abs(weights[b][:, real][:, :, ~real]).max(initial=0) < 1e-6


@pytest.fixture(scope="module")
def neox():
    hf = example.hf_gpt_neox()
    hf.set_attn_implementation("eager")
    return hf, example.gpt_neox_from_hf(hf)


def _sampler(model: pz.nn.Layer) -> sampling_mode.KVCachingTransformerLM:
    return sampling_mode.KVCachingTransformerLM.from_uncached(model, cache_len=CACHE, batch_axes={"batch": BATCH})


@pytest.fixture(scope="module")
def sampled(neox):
    """penzai's temperature_sample_pyloop (seeded sampling) inside attach on a fresh sampler."""
    _, model = neox
    sampler = _sampler(model)
    with attnflow.attach(sampler) as rec:
        out = simple_decoding_loop.temperature_sample_pyloop(sampler, _named(_prompt()), jax.random.key(7),
                                                             max_sampling_steps=NEW)
    generated = np.asarray(out.untag("batch", "seq").unwrap())
    return rec, np.concatenate([_prompt(), generated], axis=1)


def test_penzai_sampling_loop_is_stitched_into_the_teacher_forced_trace(neox, sampled):
    rec, sequences = sampled
    assert len(rec.traces) == 1 and len(rec.steps) == NEW  # the prefill, then one call per fed-back token
    assert [step.queries[None] for step in rec.steps] == [PROMPT] + [1] * (NEW - 1)
    assert rec.steps[1].layers[0].weights.shape[-1] == CACHE  # each call attends to the whole static cache
    trace = rec.trace
    stream = trace.stream()
    expected_mask = np.concatenate([_prompt() != 0, np.ones((BATCH, NEW - 1), bool)], axis=1)
    np.testing.assert_array_equal(stream.mask, expected_mask)
    assert [list(labels) for labels in stream.tokens] == [[str(t) for t in row] for row in sequences[:, :-1]]
    generation = trace.metadata["generation"]
    assert generation["first_generated"] == PROMPT and generation["new_tokens"] == NEW
    assert [list(row) for row in generation["generated_ids"]] == sequences[:, PROMPT:].tolist()
    reference = penzai_reference(neox[1], sequences[:, :-1])
    assert len(trace.layers) == len(reference) == 2
    for layer, expected in zip(trace.layers, reference, strict=True):
        assert layer.weights.shape == (BATCH, 4, LENGTH, LENGTH)
        assert_same_real(layer.weights, expected, expected_mask, atol=1e-6)
    assert trace.causal
    rows = attnflow.rollout(trace, sources="generated")
    assert rows.shape == (BATCH, NEW, LENGTH)


def _penzai_greedy(sampler, ids: np.ndarray) -> np.ndarray:
    """Greedy decoding written here: the prompt, then each argmax token fed back (the last one is not fed)."""
    logits = sampler(_named(ids))
    out = []
    for step in range(NEW):
        token = np.asarray(logits.untag("batch", "seq", "vocabulary").unwrap())[:, -1].argmax(-1)
        out.append(token)
        if step < NEW - 1:
            logits = sampler(_named(token[:, None]))
    return np.stack(out, axis=1)


def test_hugging_face_and_its_penzai_conversion_generate_the_same_stitched_trace(neox):
    hf, model = neox
    ids = _prompt()
    mask = torch.from_numpy((ids != 0).astype(np.int64))
    with attnflow.attach(hf) as torch_rec:
        out = hf.generate(input_ids=torch.from_numpy(ids), attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0)
    sampler = _sampler(model)
    with attnflow.attach(sampler) as jax_rec:  # a loop of its own: the generation ends with the block
        generated = _penzai_greedy(sampler, ids)
    hf_generated = out[:, PROMPT:].numpy()
    np.testing.assert_array_equal(generated, hf_generated)  # the same tokens first: a difference fails
    torch_trace, jax_trace = torch_rec.trace, jax_rec.trace
    real = torch_trace.stream().mask
    np.testing.assert_array_equal(jax_trace.stream().mask, real)
    assert len(torch_trace.layers) == len(jax_trace.layers) == 2
    for a, b in zip(torch_trace.layers, jax_trace.layers, strict=True):
        assert_same_real(b.weights, a.weights, real, atol=1e-5)
    # the loop of its own fed NEW - 1 tokens back: the trace knows those, not the last one
    assert jax_trace.metadata["generation"]["new_tokens"] == NEW - 1
    np.testing.assert_allclose(attnflow.rollout(jax_trace, sources="generated")[:, :NEW - 1],
                               attnflow.rollout(torch_trace, sources="generated")[:, :NEW - 1], atol=1e-5)


def test_penzai_sampler_refusals(neox):
    """target= needs one pass over the sequence; a cache filled before attach cannot be stitched from 0."""
    _, model = neox
    sampler = _sampler(model)
    with pytest.raises(attnflow.OptionError, match="capture the uncached model"):
        with attnflow.attach(sampler, target=5):
            sampler(_named(_prompt()))
    assert int(sampler.cache_end_index.value) == 0  # refused before the call ran
    sampler.cache_end_index.value = PROMPT  # as after a prefill run before attach
    with pytest.raises(attnflow.AdapterError, match="already holds 5 tokens"):
        with attnflow.attach(sampler):
            sampler(_named(_prompt()[:, -1:]))


# -- gemma: gm.text.Sampler ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma_sampled():
    """gm.text.Sampler (greedy) on test_gemma.py's tiny gm.nn.Transformer (2 layers: a sliding window of 3 and a
    global one, 6 query heads in 2 key/value groups, width 36, vocabulary 67), 3 prompts of 4, 2 and 3 tokens
    (gemma adds BOS and right-pads them to 5), 4 new tokens; the tokenizer is a subclass written here that reads
    ids from the text (gemma's own fetches its vocabulary remotely)."""
    import test_gemma as tiny

    gm = tiny.gm
    model, params = tiny.make_model(2), tiny.params(2)
    sampler = gm.text.Sampler(model=model, params=params, tokenizer=_ids_tokenizer(), cache_length=CACHE + 2,
                              max_out_length=NEW + 2, pad_length=None)
    with attnflow.attach(model) as rec:
        out = sampler.sample(["5 6 7 8", "9 10", "11 12 13"], max_new_tokens=NEW, return_state=True)
    return tiny, model, params, rec, np.asarray(out.state.predicted_tokens)[:, :NEW]


def _gemma_layer_inputs(tiny, model, params, ids: np.ndarray) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    """Each Attention layer's inputs (x, positions, mask), read by a plain flax interceptor while jax compiles
    the call (once: eager gemma would compile each operation)."""
    from flax import linen as nn

    names: list[str] = []
    seen: list[tuple[np.ndarray, ...]] = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, tiny._modules.Attention) and context.method_name == "__call__":
            x, positions, _, mask = args
            names.append(context.module.path[0])  # the inputs arrive when the compiled call runs (gemma's nn.jit)
            jax.debug.callback(lambda *arrays: seen.append(tuple(np.asarray(a) for a in arrays)), x, positions, mask,
                               ordered=True)
        return next_fun(*args, **kwargs)

    def run(tokens):
        with nn.intercept_methods(spy):
            return model.apply({"params": params}, tokens).logits

    jax.block_until_ready(jax.jit(run)(jnp.asarray(ids, jnp.int32)))
    jax.effects_barrier()
    return list(zip(names, seen, strict=True))


def _ids_tokenizer():
    """A gemma tokenizer (Gemma 3's special ids) whose pieces are the ids written in the text."""
    import test_gemma as tiny

    @dataclasses.dataclass(frozen=True)
    class Ids(tiny.gm.text.Tokenizer):
        path: str = ""
        special_tokens = tiny.gm.text.Gemma3Tokenizer.special_tokens
        VERSION = 0

        def encode(self, text, *, add_bos=False, add_eos=False):
            return [2] * add_bos + [int(t) for t in text.split()] + [1] * add_eos

        def decode(self, ids):
            return " ".join(str(int(i)) for i in np.asarray(ids).reshape(-1))

    return Ids()


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract")  # the reference's fully masked rows
def test_gemma_sampler_is_stitched_into_the_teacher_forced_trace(gemma_sampled):
    tiny, model, params, rec, generated = gemma_sampled
    prompts = [[2, 5, 6, 7, 8], [2, 9, 10], [2, 11, 12, 13]]
    width = max(map(len, prompts))
    left = np.array([[0] * (width - len(p)) + p for p in prompts])  # the stitched trace's left-padded layout
    sequences = np.concatenate([left, generated], axis=1)
    assert len(rec.traces) == 1 and len(rec.steps) == NEW + 1  # prefill, the prompt's last token again, 3 more
    trace = rec.trace
    length = width + NEW - 1
    ended = np.cumsum(np.isin(generated[:, :-1], (1, 106)), axis=1) - np.isin(generated[:, :-1], (1, 106))
    expected_mask = np.concatenate([left != 0, ended == 0], axis=1)
    np.testing.assert_array_equal(trace.stream().mask, expected_mask)
    assert [list(labels) for labels in trace.stream().tokens] == [[str(t) for t in row] for row in sequences[:, :-1]]
    assert trace.metadata["generation"]["first_generated"] == width and trace.causal
    # gemma's own attention over the left-padded sequences, re-derived in float64 by test_gemma.py's reference
    reference = [tiny.attention_reference(params[layer]["attn"], *inputs, sliding=i == 0, kv_heads=2)
                 for i, (layer, inputs) in enumerate(_gemma_layer_inputs(tiny, model, params, sequences[:, :-1]))]
    assert len(trace.layers) == len(reference) == 2
    for layer, expected in zip(trace.layers, reference, strict=True):
        assert layer.weights.shape == (BATCH, tiny.HEADS, length, length)
        assert_same_real(layer.weights, expected, expected_mask, atol=1e-6)
    assert attnflow.flow(trace, sources="generated").shape == (BATCH, NEW, length)


def test_gemma_sampler_refusals(gemma_sampled):
    """target= needs one pass over the sequence: refused before the prefill runs."""
    tiny, model, params, _, _ = gemma_sampled
    sampler = tiny.gm.text.Sampler(model=model, params=params, tokenizer=_ids_tokenizer(), cache_length=CACHE + 2,
                                   max_out_length=NEW + 2, pad_length=None)
    with pytest.raises(attnflow.OptionError, match="capture the model on the finished sequences"):
        with attnflow.attach(model, target=5):
            sampler.sample(["5 6"], max_new_tokens=2)

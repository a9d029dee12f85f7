"""generate() inside attach(): one trace per call, equal to one teacher-forced forward pass.

The reference is the model's own eager attention (``output_attentions=True``) on a deep copy, over the
finished sequences but their last token, with the positions generate() used (the attention mask's
cumulative sum for a left-padded prompt). Sizes differ on every axis: batch 2, prompt 7 (item 1
left-padded by 2), new tokens 9, heads 4 (2 key-value heads), layers 2 or 3, vocabulary 29 or 31.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

import attnflow
from attnflow import OptionError

PROMPT, NEW, EOS = 7, 9, 5


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=29, n_embd=24, n_layer=3, n_head=4, n_inner=11, n_positions=40, eos_token_id=EOS,
        pad_token_id=0, bos_token_id=1,
    )).eval()


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=29, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=11, max_position_embeddings=40, eos_token_id=EOS, pad_token_id=0, bos_token_id=1,
    )).eval()


def gemma2():
    """Layer 0 attends over a sliding window of 4 keys, layer 1 over everything."""
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=29, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=6, intermediate_size=11, max_position_embeddings=40, sliding_window=4, eos_token_id=EOS,
        pad_token_id=0, bos_token_id=1,
    )).eval()


def t5():
    torch.manual_seed(0)
    # encoder and decoder depths are equal: transformers 5 sizes T5's generation cache by the encoder's
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=31, d_model=20, d_kv=5, d_ff=13, num_layers=3, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0, eos_token_id=EOS, pad_token_id=0,
    )).eval()


def bart():
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=31, d_model=24, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=13, decoder_ffn_dim=11, max_position_embeddings=40,
        forced_bos_token_id=None, forced_eos_token_id=None, eos_token_id=EOS, decoder_start_token_id=2,
        pad_token_id=1,
    )).eval()


def prompt(vocab, *, left=True):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(6, vocab, (2, PROMPT), generator=generator)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    if left:
        mask[1, :2] = 0
        ids[1, :2] = 0
    else:
        mask[1, 5:] = 0
    return ids, mask


class EndItem(transformers.LogitsProcessor):
    """Forces the end-of-sequence token for item ``item`` at step ``step`` (so later positions are padding)."""

    def __init__(self, item, step, start):
        self.item, self.step, self.start = item, step, start

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.start == self.step:
            scores[self.item] = -1e9
            scores[self.item, EOS] = 0.0
        else:
            scores[:, EOS] = -1e9
        return scores


class FailAt(transformers.LogitsProcessor):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= self.length:
            raise RuntimeError("stopped by the test")
        return scores


def generate(model, ids, mask, seed=1, **settings):
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, **settings)


def eager(model, **inputs):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        return reference(**inputs, output_attentions=True)


def teacher_forced(model, sequences, mask):
    """The decoder's eager attention over ``sequences[:, :-1]`` with generate()'s positions."""
    inputs = sequences[:, :-1]
    full = torch.ones_like(inputs)
    full[:, :PROMPT] = mask
    positions = (full.cumsum(-1) - 1).masked_fill(full == 0, 1)
    return [a.double().numpy() for a in eager(model, input_ids=inputs, attention_mask=full, position_ids=positions).attentions]


def expected_mask(mask, sequences, start):
    """The prompt's mask, then generated tokens up to and including each item's first end of sequence."""
    out = []
    for b, row in enumerate(sequences[:, start:-1].tolist()):
        real, ended = [], False
        for token in row:
            real.append(not ended)
            ended = ended or token == EOS
        out.append(list(mask[b].bool().tolist()) + real)
    return np.array(out)


def assert_same_real(trace_layer, reference, query_mask, key_mask, atol=1e-5):
    for b in range(reference.shape[0]):
        q, k = query_mask[b], key_mask[b]
        np.testing.assert_allclose(trace_layer.weights[b][:, q][:, :, k], reference[b][:, q][:, :, k], atol=atol)
        assert np.abs(trace_layer.weights[b][:, q][:, :, ~k]).max(initial=0) < 1e-6  # nothing on padding


CASES = [
    (gpt2, {"do_sample": False}),
    (gpt2, {"do_sample": True, "top_k": 0}),
    (llama, {"do_sample": False}),
    (llama, {"do_sample": True, "top_k": 0, "cache_implementation": "static"}),
    (gemma2, {"do_sample": False}),
    (gemma2, {"do_sample": False, "cache_implementation": "static"}),
]


@pytest.mark.parametrize(("build", "settings"), CASES, ids=[
    "gpt2-greedy", "gpt2-sampling", "llama-gqa-greedy", "llama-gqa-sampling-static", "gemma2-sliding",
    "gemma2-sliding-static",
])
def test_stitched_decoder_equals_teacher_forced(build, settings):
    model = build()
    ids, mask = prompt(model.config.vocab_size)
    expected_output = generate(model, ids, mask, **settings)
    with attnflow.attach(model) as rec:
        out = generate(model, ids, mask, **settings)
    assert torch.equal(out, expected_output)  # generation is not changed by attaching
    trace = rec.trace
    stream = trace.streams[trace.default_stream()]
    assert stream.length == PROMPT + NEW - 1 and stream.causal
    np.testing.assert_array_equal(stream.mask, expected_mask(mask, out, PROMPT))
    assert [layer.name for layer in trace.layers] == [
        layer.name for layer in attnflow.capture(model, input_ids=out[:, :-1]).layers
    ]
    for layer, reference in zip(trace.layers, teacher_forced(model, out, mask), strict=True):
        assert_same_real(layer, reference, stream.mask, stream.mask)
    steps = rec.steps
    assert len(steps) == NEW and steps[0].queries == {None: PROMPT}
    assert all(step.queries == {None: 1} for step in steps[1:])
    if settings.get("cache_implementation") == "static":  # keys padded to the cache's length
        assert steps[1].layers[-1].weights.shape[-1] > PROMPT + 1
    if build is gemma2 and "cache_implementation" not in settings:  # the window's 4 keys, the full layer's all
        assert steps[-1].layers[0].weights.shape[-1] == 4 and steps[-1].layers[1].weights.shape[-1] == PROMPT + NEW - 1


@pytest.mark.parametrize(("build", "settings"), [(t5, {}), (bart, {}), (bart, {"cache_implementation": "static"})],
                         ids=["t5", "bart", "bart-static"])
def test_stitched_encoder_decoder_equals_teacher_forced(build, settings):
    model = build()
    ids, mask = prompt(model.config.vocab_size, left=False)
    processor = transformers.LogitsProcessorList([EndItem(0, 4, 1)])
    expected_output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=processor,
                                     **settings)
    with attnflow.attach(model) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=processor,
                             **settings)
    assert torch.equal(out, expected_output)
    trace = rec.trace
    assert [s for s in trace.streams] == ["encoder", "decoder"]
    decoder, encoder = trace.streams["decoder"], trace.streams["encoder"]
    np.testing.assert_array_equal(encoder.mask, mask.bool().numpy())
    np.testing.assert_array_equal(decoder.mask, expected_mask(torch.ones(2, 1), out, 1))
    assert decoder.mask[0].sum() == 6 and decoder.mask[1].all()  # the start token and 5 generated, the last the end
    output = eager(model, input_ids=ids, attention_mask=mask, decoder_input_ids=out[:, :-1])
    references = {"encoder": list(output.encoder_attentions), "decoder": list(output.decoder_attentions),
                  "cross": list(output.cross_attentions)}
    for layer in trace.layers:
        reference = references["cross" if layer.kind == "cross" else layer.query_stream].pop(0).double().numpy()
        assert_same_real(layer, reference, trace.streams[layer.query_stream].mask, trace.streams[layer.key_stream].mask)
    assert not any(references.values())
    assert rec.steps[0].queries == {"encoder": PROMPT} and rec.steps[1].queries == {"decoder": 1}
    scores = attnflow.rollout(trace, sources="generated")
    assert scores["encoder"].shape == (2, out.shape[1] - 1, PROMPT)
    assert not scores["encoder"][0, 6:].any()  # after item 0's end of sequence


def test_generated_sources_and_the_node_that_predicts_each_token():
    model = llama()
    ids, mask = prompt(model.config.vocab_size)
    processor = transformers.LogitsProcessorList([EndItem(1, 6, PROMPT)])
    with attnflow.attach(model, tokens=None) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, logits_processor=processor)
    trace = rec.trace
    generation = trace.metadata["generation"]
    assert generation["first_generated"] == PROMPT and generation["new_tokens"] == NEW
    assert [list(row) for row in generation["generated_ids"]] == out[:, PROMPT:].tolist()
    rows = attnflow.rollout(trace, sources="generated")
    flows = attnflow.flow(trace, sources="generated")
    assert rows.shape == flows.shape == (2, NEW, PROMPT + NEW - 1)
    everything = attnflow.rollout(trace)
    # row r explains generated token r: the row of position PROMPT - 1 + r, which predicts it
    np.testing.assert_allclose(rows[0], everything[0, PROMPT - 1:], atol=1e-12)
    np.testing.assert_allclose(rows[1, :7], everything[1, PROMPT - 1:PROMPT + 6], atol=1e-12)
    assert not rows[1, 7:].any() and not flows[1, 7:].any()  # item 1 generated 7 tokens, the 7th its end
    assert not rows[0, 2, PROMPT + 2:].any()  # causal: nothing from later tokens
    explanation = attnflow.explain(trace, ["rollout", "flow"], sources="generated")
    np.testing.assert_allclose(explanation["rollout"], rows, atol=1e-12)
    np.testing.assert_array_equal(explanation.sources[0], np.arange(PROMPT - 1, PROMPT + NEW - 1))
    # the generated x prompt picture: one row per generated token, labelled by it, over the real prompt tokens
    from matplotlib.image import AxesImage

    from attnflow import plot

    for b, (count, pad) in enumerate([(NEW, 0), (7, 2)]):
        figure = plot.generation_map(explanation, "rollout", batch_index=b)
        shown = next(a for a in figure.axes[0].get_children() if isinstance(a, AxesImage)).get_array()
        np.testing.assert_allclose(np.asarray(shown), rows[b, :count, pad:PROMPT], atol=1e-12)
        labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
        produced = [str(t) for t in out[b, PROMPT:PROMPT + count].tolist()]
        subscript = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")  # a repeated token carries its position
        assert labels == [f"{t}{str(PROMPT + k).translate(subscript)}" if produced.count(t) > 1 else t
                          for k, t in enumerate(produced)]
    # one item alone, padding cropped: the same rows, over its real tokens
    alone = trace.select(1, crop=True)
    assert alone.metadata["generation"]["first_generated"] == PROMPT - 2
    real = trace.streams[trace.default_stream()].mask[1]
    cropped = attnflow.rollout(alone, sources="generated")[0]
    assert cropped.shape == (NEW - 1, real.sum())  # 2 prompt tokens fewer; the last node is padding
    np.testing.assert_allclose(cropped[:7], rows[1][:7][:, real], atol=1e-12)
    assert not cropped[7:].any() and alone.metadata["generation"]["lengths"] == (7,)
    with pytest.raises(OptionError, match="not of a generate"):
        attnflow.rollout(attnflow.capture(model, input_ids=ids), sources="generated")


def test_rerun_equals_stitch_and_follows_beam_search():
    model = gpt2()
    ids, mask = prompt(model.config.vocab_size)
    with attnflow.attach(model) as stitched, attnflow.attach(model, generation="rerun") as rerun:
        out = generate(model, ids, mask)
    assert len(stitched.traces) == len(rerun.traces) == 1  # the re-run pass is not a trace of the stitcher
    real = stitched.trace.streams[stitched.trace.default_stream()].mask
    np.testing.assert_array_equal(rerun.trace.streams[rerun.trace.default_stream()].mask, real)
    for a, b in zip(stitched.trace.layers, rerun.trace.layers, strict=True):
        assert_same_real(a, b.weights, real, real)
    assert rerun.trace.metadata["generation"]["mode"] == "rerun" and torch.equal(out, generate(model, ids, mask))
    with attnflow.attach(model) as rec, pytest.raises(OptionError, match="beam search.*generation='rerun'"):
        generate(model, ids, mask, num_beams=2)
    with attnflow.attach(model, target=3) as rec, pytest.raises(OptionError, match="target=.*generation='rerun'"):
        generate(model, ids, mask)
    with attnflow.attach(model, generation="rerun") as rec:
        beams = generate(model, ids, mask, num_beams=2)
    stream = rec.trace.streams[rec.trace.default_stream()]
    for layer, reference in zip(rec.trace.layers, teacher_forced(model, beams, mask), strict=True):
        assert_same_real(layer, reference, stream.mask, stream.mask)


def test_forward_passes_and_generations_each_give_one_trace():
    model = gpt2()
    ids, mask = prompt(model.config.vocab_size)
    with attnflow.attach(model) as rec:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        generate(model, ids, mask, max_length=None)
        generate(model, ids[:1], mask[:1])
    lengths = [t.streams[t.default_stream()].length for t in rec.traces]
    assert lengths == [PROMPT, PROMPT + NEW - 1, PROMPT + NEW - 1]
    assert [t.batch_size for t in rec.traces] == [2, 2, 1]
    assert "generation" not in rec.traces[0].metadata


def test_a_generation_that_raises_leaves_nothing_behind():
    model = llama()
    ids, mask = prompt(model.config.vocab_size)
    before = model.config._attn_implementation
    with attnflow.attach(model) as rec:
        with pytest.raises(RuntimeError, match="stopped by the test"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                           logits_processor=transformers.LogitsProcessorList([FailAt(PROMPT + 3)]))
        assert rec.traces == [] and not rec.in_call
        generate(model, ids, mask)  # the attach still works
        assert len(rec.traces) == 1
    assert "generate" not in model.__dict__ and model.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with attnflow.attach(model, generation="rerun") as rec, pytest.raises(RuntimeError, match="stopped"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                       logits_processor=transformers.LogitsProcessorList([FailAt(PROMPT + 3)]))
    assert "generate" not in model.__dict__ and not any(m._forward_hooks for m in model.modules())
    with attnflow.attach(model, generation="rerun") as rec:  # the mute was undone: passes record again
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    assert len(rec.traces) == 1


def test_generation_trace_round_trips(tmp_path):
    model = gpt2()
    ids, mask = prompt(model.config.vocab_size)
    with attnflow.attach(model) as rec:
        generate(model, ids, mask)
    rec.trace.save(tmp_path / "generation.safetensors")
    loaded = attnflow.load(tmp_path / "generation.safetensors")
    np.testing.assert_allclose(attnflow.flow(loaded, sources="generated"), attnflow.flow(rec.trace, sources="generated"))


def test_generation_option_is_checked():
    with pytest.raises(OptionError, match="generation must be 'stitch' or 'rerun'"):
        with attnflow.attach(gpt2(), generation="replay"):
            pass

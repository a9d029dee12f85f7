"""TransformerLens and nnsight (the ``interop`` extra).

TransformerLens: the ``transformer_lens`` adapter against ``run_with_cache``'s patterns, on a tiny
``HookedTransformer`` with a distinct size on every axis. nnsight: ``attach(lm)`` around ``lm.trace``/
``lm.generate`` and ``capture(lm, ...)`` against a plain capture of the wrapped Hugging Face model (tiny GPT-2 from
a config, a word-level tokenizer built here; nothing is downloaded).
"""

from __future__ import annotations

import inspect
import warnings

import nnsight
import numpy as np
import pytest
import torch
import transformer_lens
import transformers
from attnflow.adapters._torch.transformer_lens import TransformerLensAdapter

import attnflow
from attnflow.testing import AdapterConformance

# every axis its own size: layers, heads, head width, model width, sequence, batch (and vocabulary, MLP)
LAYERS, HEADS, D_HEAD, D_MODEL, SEQ, BATCH, VOCAB, D_MLP = 2, 3, 5, 11, 7, 4, 13, 17


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- TransformerLens ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lens():
    config = transformer_lens.HookedTransformerConfig(
        n_layers=LAYERS, n_heads=HEADS, d_head=D_HEAD, d_model=D_MODEL, d_mlp=D_MLP, n_ctx=16, d_vocab=VOCAB,
        act_fn="gelu", attention_dir="causal", normalization_type="LN", seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x points to TransformerBridge; HookedTransformer stays
        return transformer_lens.HookedTransformer(config).eval()


def lens_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def test_transformer_lens_equals_run_with_cache(lens):
    ids = lens_ids()
    with torch.no_grad():
        _, cache = lens.run_with_cache(ids)
    trace = attnflow.capture(lens, ids)
    assert trace.metadata["adapter"] == "transformer_lens"
    assert [layer.name for layer in trace.layers] == [f"blocks.{i}.attn" for i in range(LAYERS)]
    assert trace.causal and trace.tokens[2] == [str(int(t)) for t in ids[2]]
    for index, layer in enumerate(trace.layers):
        assert layer.weights.shape == (BATCH, HEADS, SEQ, SEQ)
        np.testing.assert_array_equal(layer.weights, cache["pattern", index].numpy())  # exact: the same tensor
    assert hook_count(lens) == 0


def test_transformer_lens_padding_from_the_attention_mask(lens):
    ids = lens_ids(1)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[3, :1] = 0
    with torch.no_grad():
        _, cache = lens.run_with_cache(ids, attention_mask=mask)
    with attnflow.attach(lens) as rec:
        lens(ids, attention_mask=mask)
    trace = rec.trace
    np.testing.assert_array_equal(trace.mask, mask.numpy().astype(bool))
    for index, layer in enumerate(trace.layers):
        np.testing.assert_array_equal(layer.weights, cache["pattern", index].numpy())
    # the padded item's flow from its last token equals that of the same item alone
    alone = attnflow.capture(lens, ids[1:2, 3:])
    np.testing.assert_allclose(attnflow.rollout(trace)[1][3:, 3:], attnflow.rollout(alone)[0], atol=1e-6)


def test_transformer_lens_attention_gradients_equal_autograd(lens):
    ids = lens_ids(2)
    patterns: list[torch.Tensor] = []

    def keep(pattern, hook):
        pattern.retain_grad()
        patterns.append(pattern)

    logits = lens.run_with_hooks(ids, fwd_hooks=[(lambda name: name.endswith("hook_pattern"), keep)])
    last = logits[:, -1]
    last.gather(1, last.argmax(-1, keepdim=True)).sum().backward()
    lens.zero_grad(set_to_none=True)
    trace = attnflow.capture(lens, ids, target=None)
    for layer, pattern in zip(trace.layers, patterns):
        np.testing.assert_allclose(layer.extras["attn_grad"], pattern.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in lens.parameters())


def test_transformer_lens_generate_records_the_whole_sequence_and_restores_hooks(lens):
    ids = lens_ids(3)[:2]
    # (TransformerLens 3.9's cached generation fails on a model without a tokenizer: the steps run uncached)
    settings = {"max_new_tokens": 3, "stop_at_eos": False, "verbose": False, "do_sample": False,
                "use_past_kv_cache": False}
    expected = lens.generate(ids, **settings)
    with attnflow.attach(lens) as rec:
        output = lens.generate(ids, **settings)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)  # the generation itself is left alone
    assert len(rec.traces) == 1 and "generate" not in vars(lens)
    with torch.no_grad():
        _, cache = lens.run_with_cache(output[:, :-1])
    for index, layer in enumerate(rec.trace.layers):
        np.testing.assert_array_equal(layer.weights, cache["pattern", index].numpy())
    assert rec.trace.metadata["generation"]["first_generated"] == SEQ
    with pytest.raises(attnflow.AdapterError, match="past_kv_cache.*inside attach"), attnflow.attach(lens):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        lens(ids, past_kv_cache=TransformerLensKeyValueCache.init_cache(lens.cfg, lens.cfg.device, 2))
    assert hook_count(lens) == 0

    def boom(tensor, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attnflow.attach(lens):
        lens.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    assert hook_count(lens) == 0
    with pytest.raises(attnflow.OptionError, match="needs no options"):
        attnflow.capture(lens, ids, adapter_options={"layout": "bhqk"})


# -- nnsight ------------------------------------------------------------------------------------------------------
WORDS = ["<pad>", "<unk>", "<eos>", *"the cat sat on a mat dog ran far away".split()]


@pytest.fixture(scope="module")
def tokenizer():
    import tokenizers
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=HEADS * 4, n_layer=LAYERS,
                                     n_head=HEADS, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def lm(gpt2, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LanguageModel -> TransformersModel; both are Envoys
        return nnsight.LanguageModel(gpt2, tokenizer=tokenizer)


def token_ids() -> torch.Tensor:
    return torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])


def assert_same(trace, plain):
    assert [layer.name for layer in trace.layers] == [layer.name for layer in plain.layers]
    for layer, ref in zip(trace.layers, plain.layers):
        np.testing.assert_array_equal(layer.weights, ref.weights)
    assert trace.tokens == plain.tokens
    np.testing.assert_array_equal(trace.mask, plain.mask)
    assert trace.causal == plain.causal
    assert dict(trace.metadata) == dict(plain.metadata)


def test_attach_around_trace_and_capture_equal_a_plain_capture(lm, gpt2, tokenizer):
    ids = token_ids()
    plain = attnflow.capture(gpt2, input_ids=ids, tokens=tokenizer)
    assert plain.tokens[0] == ["the", "cat", "sat", "on", "a"]
    before = (hook_count(gpt2), inspect.signature(gpt2.forward))
    with attnflow.attach(lm, tokens=tokenizer) as rec:
        with lm.trace(ids):
            hidden = lm.transformer.h[0].output.save()
    assert_same(rec.trace, plain)
    assert hidden is not None
    assert_same(attnflow.capture(lm, ids, tokens=tokenizer), plain)
    # the wrapped module itself, token ids positional: bound against its real forward, not nnsight's controller
    assert_same(attnflow.capture(gpt2, ids, tokens=tokenizer), plain)
    assert (hook_count(gpt2), inspect.signature(gpt2.forward)) == before


def test_padded_text_through_nnsight_equals_the_tokenised_batch(lm, gpt2, tokenizer):
    texts = ["the cat sat", "a dog ran far away"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")  # nnsight pads left, positions from the mask
    positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    plain = attnflow.capture(gpt2, **encoded, position_ids=positions, tokens=tokenizer)
    assert not plain.mask.all()
    with attnflow.attach(lm, tokens=tokenizer) as rec:
        with lm.trace(texts):
            pass
    assert_same(rec.trace, plain)
    assert_same(attnflow.capture(lm, texts, tokens=tokenizer), plain)


def test_nnsight_wrapper_with_positional_ids_gets_real_labels(gpt2, tokenizer):
    ids = token_ids()
    plain = attnflow.capture(gpt2, input_ids=ids, tokens=tokenizer)
    wrapped = nnsight.NNsight(gpt2)  # passes the trace's inputs on positionally
    with attnflow.attach(wrapped, tokens=tokenizer) as rec:
        with wrapped.trace(ids):
            pass
    assert rec.trace.tokens[1] == ["mat", "dog", "ran", "far", "away"]
    assert_same(rec.trace, plain)


def test_generate_inside_attach_equals_the_plain_model(lm, gpt2, tokenizer):
    ids = token_ids()
    with attnflow.attach(gpt2, tokens=tokenizer) as rec:
        expected = gpt2.generate(ids, max_new_tokens=3, do_sample=False)
    with attnflow.attach(lm, tokens=tokenizer) as wrapped:
        with lm.generate(ids, max_new_tokens=3, do_sample=False) as tracer:
            output = tracer.result.save()
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert_same(wrapped.trace, rec.trace)
    assert wrapped.trace.metadata["generation"]["new_tokens"] == 3


def test_capture_inside_a_trace_body_is_refused(lm, gpt2):
    ids = token_ids()
    before = hook_count(gpt2)
    with pytest.raises(attnflow.AdapterError, match="inside an nnsight trace body.*around `with lm.trace"):
        with lm.trace(ids):
            attnflow.capture(lm, ids)
    assert hook_count(gpt2) == before
    # and after a failed run the wrapper and the model are left as found
    with pytest.raises(IndexError), attnflow.attach(lm):
        with lm.trace(torch.tensor([[3, 4, 99]])):  # 99: outside the vocabulary: the embedding raises
            pass
    assert hook_count(gpt2) == before


def make_lens():
    config = transformer_lens.HookedTransformerConfig(
        n_layers=LAYERS, n_heads=HEADS, d_head=D_HEAD, d_model=D_MODEL, d_mlp=D_MLP, n_ctx=16, d_vocab=VOCAB,
        act_fn="gelu", attention_dir="causal", normalization_type="LN", seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return transformer_lens.HookedTransformer(config).eval()


class TestTransformerLensConformance(AdapterConformance):
    """The kit's checks: weights, restored model, raising and interrupted passes, nested, overlapping, threads."""

    adapter = TransformerLensAdapter()

    def make_model(self):
        return make_lens()

    def make_inputs(self, model):
        return (lens_ids(4),), {}

    def reference(self, model, inputs):
        with torch.no_grad():
            _, cache = model.run_with_cache(*inputs[0], **inputs[1])
        return [cache["pattern", index].numpy() for index in range(LAYERS)]

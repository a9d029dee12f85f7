"""Every Python block of the guides in docs/ runs in the suite (issue 23), in the namespace the text around it
sets up: tiny models here stand in for "your model". A block whose first line says it lists signatures is a
listing, not an example, and is the only kind left out; a new block without a setup below fails this test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import attnflow

ROOT = Path(__file__).resolve().parents[1]
LISTING = "# signatures, not a runnable example"


def blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / name).read_text(), re.S)


def run(name: str, number: int, namespace: dict) -> dict:
    import linecache

    code = blocks(name)[number - 1]
    filename = f"docs/{name} block {number}"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # source readable (nnsight)
    exec(compile(code, filename, "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


# -- setups: what the text around each block assumes ------------------------------------------------------------
def tiny_gpt2(lm_head: bool = False):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=64, n_embd=12, n_layer=2, n_head=3,
                                     pad_token_id=0, eos_token_id=2, bos_token_id=2, attn_implementation="eager")
    return (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(config).eval()


WORDS = ["<pad>", "<unk>", "<eos>", *"The the cat sat on a mat dog ran far away".split()]


def word_tokenizer():
    import tokenizers
    import transformers

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


#: Blocks that list calls for several kinds of model at once (no one namespace runs them all), with the reason.
CATALOGUES = {("pictures.md", 1): "every view, for encoders, decoders, encoder-decoders and ViTs side by side"}


def test_every_block_has_a_setup_or_is_a_listing():
    found = {(path.name, i + 1) for path in sorted((ROOT / "docs").glob("*.md"))
             for i, code in enumerate(blocks(path.name)) if not code.startswith(LISTING)} - set(CATALOGUES)
    assert found == set(SETUPS), f"blocks without a setup: {sorted(found - set(SETUPS))}; stale: {sorted(set(SETUPS) - found)}"


def setup_value_map() -> dict:
    return {}


def setup_softmax_layout() -> dict:
    import torch

    return {"attnflow": attnflow, "model": tiny_gpt2(lm_head=True), "ids": torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]]),
            "mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}


def setup_nnsight() -> dict:
    import nnsight

    return {"attnflow": attnflow, "nnsight": nnsight, "hf_model": tiny_gpt2(lm_head=True), "tokenizer": word_tokenizer()}


def setup_methods_guide() -> dict:
    return {}


def setup_generation() -> dict:
    model, tokenizer = tiny_gpt2(lm_head=True), word_tokenizer()
    return {"attnflow": attnflow, "model": model, "tokenizer": tokenizer,
            "inputs": dict(tokenizer(["the cat sat"], return_tensors="pt"))}


def setup_flax_hand_attention() -> dict:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    class Attention(nn.Module):  # grouped-query attention written by hand: softmax over (b, t, g, n, s)
        @nn.compact
        def __call__(self, x):
            q = nn.DenseGeneral((2, 3, 4), name="q")(x)
            k = nn.DenseGeneral((2, 4), name="k")(x)
            v = nn.DenseGeneral((2, 4), name="v")(x)
            probs = nn.softmax(jnp.einsum("btgnd,bsgd->btgns", q, k) / 2.0, axis=-1)
            out = jnp.einsum("btgns,bsgd->btgnd", probs, v).reshape(*x.shape[:2], -1)
            return nn.Dense(x.shape[-1], name="out")(out)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + Attention(name="attn")(x)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = Block(name=f"layers_{i}")(x)
            return x

    x = jax.random.normal(jax.random.key(0), (2, 5, 7))
    model = Model()
    return {"attnflow": attnflow, "model": model, "variables": model.init(jax.random.key(1), x), "x": x}


def setup_compare() -> dict:
    rng = np.random.default_rng(0)
    weights = [rng.dirichlet(np.ones(6), size=(2, 3, 6)) for _ in range(2)]
    noisy = [w + 1e-9 * (np.eye(6) - 1 / 6) for w in weights]  # the same attention, rounded differently
    return {"attnflow": attnflow, "torch_trace": attnflow.AttentionTrace.from_arrays(weights, tokens=[list("abcdef")] * 2),
            "jax_trace": attnflow.AttentionTrace.from_arrays(noisy, tokens=[list("abcdef")] * 2)}


@pytest.fixture(scope="module")
def minilm_namespace():
    """docs/faithfulness.md's first block sets up the packaged model; docs/reproduction.md's block reuses it."""
    return run("faithfulness.md", 1, {})


SETUPS = {
    ("adapters.md", 3): setup_value_map,
    ("adapters.md", 4): setup_softmax_layout,
    ("adapters.md", 5): setup_nnsight,
    ("faithfulness.md", 1): None,
    ("generation.md", 1): setup_generation,
    ("jax.md", 1): setup_flax_hand_attention,
    ("jax.md", 2): setup_compare,
    ("methods.md", 1): setup_methods_guide,
    ("methods.md", 2): None,
    ("reproduction.md", 1): None,
}


def test_value_map_block():
    from attnflow.adapters._torch import _values

    saved = dict(_values.VALUE_MAPS)
    try:
        run("adapters.md", 3, setup_value_map())
        assert _values.VALUE_MAPS["distilbert"].norm == "sa_layer_norm"
    finally:
        _values.VALUE_MAPS.clear()
        _values.VALUE_MAPS.update(saved)


def test_softmax_layout_block():
    namespace = run("adapters.md", 4, setup_softmax_layout())
    assert namespace["trace"].num_layers == 2 and namespace["trace"].num_heads == (3, 3)


def test_nnsight_block():
    namespace = run("adapters.md", 5, setup_nnsight())
    assert namespace["trace"].num_layers == 2 and namespace["trace"].tokens[0] == ["The", "cat", "sat"]


def test_generation_block():
    namespace = run("generation.md", 1, setup_generation())
    assert namespace["rows"].shape[:2] == (1, 32)  # a row per generated token, at the position predicting it


def test_flax_hand_attention_block():
    namespace = run("jax.md", 1, setup_flax_hand_attention())
    assert namespace["trace"].layer_names == ["layers_0/attn", "layers_1/attn"]
    assert namespace["trace"].num_heads == (6, 6)  # 2 key/value groups of 3 query heads


def test_compare_block(capsys):
    run("jax.md", 2, setup_compare())
    assert "verdict: OK" in capsys.readouterr().out


def test_methods_guide_blocks():
    namespace = run("methods.md", 1, setup_methods_guide())
    try:
        run("methods.md", 2, namespace)  # check_method(Smoothed()): raises AssertionError on a broken invariant
    finally:
        attnflow.unregister_method("smoothed")


@pytest.mark.slow
def test_faithfulness_and_reproduction_blocks(minilm_namespace):
    assert np.isfinite(minilm_namespace["report"].spearman["flow"]["blankout"]).all()
    namespace = run("reproduction.md", 1, minilm_namespace)
    assert set(namespace["report"].aopc["flow"]) >= {"comprehensiveness", "sufficiency"}

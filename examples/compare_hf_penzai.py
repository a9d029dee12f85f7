"""PyTorch against JAX on code nobody here wrote: Hugging Face models and penzai's conversions of them.

Tiny random ``GPTNeoXForCausalLM`` (multi-head, parallel attention and feed-forward) and
``MistralForCausalLM`` (grouped-query, sliding window) models (transformers, PyTorch) are converted to JAX by
penzai's own converters (``gpt_neox.gpt_neox_from_huggingface_model``, ``mistral.mistral_from_huggingface_model``);
attnflow captures both sides (the ``transformers`` adapter on one, the ``penzai`` adapter on the other) on the
same padded batch, with ``target=`` (a vocabulary logit at each item's last real token), ``values=True`` and
``value_zeroing=True`` where the side can, and compares every method both sides can compute, after every
layer: the attention of every layer and head, rollout, flow, and ``attn_grad``, ``grad_rollout``, ``norm``,
``norm_residual``, ``alti``, ``value_zeroing``, ``effective_attention`` (GPT-NeoX's fused, per-head
interleaved query-key-value projection and parallel residual through the transformers adapter's GPT-NeoX value
map). Each comparison runs in float64 on both sides (tolerance 1e-9) and in float32 (1e-5; value
zeroing :data:`VALUE_ZEROING_FLOAT32`, measured). Run it: ``python examples/compare_hf_penzai.py`` (prints the table;
exit status 0 when every difference is within its tolerance).

penzai's converters know float32 and bfloat16 models only: the float64 penzai model is the float32 conversion
with its parameters upcast (exactly: the Hugging Face float64 model is the float32 one upcast) and its float
constants recomputed in float64 (the query scale ``d_head ** -0.5``, the norms' epsilon).

penzai 0.2.5 was written for transformers 4; under transformers 5 its converter needs the small shims below
(they change the Hugging Face model instance only while it is converted, and put everything back):

- the RoPE settings moved into ``config.rope_parameters`` (``rope_theta``, ``partial_rotary_factor``): the
  converter reads ``config.rotary_emb_base`` and ``config.rotary_pct``, and refuses ``rope_parameters`` (and
  ``dtype``) as configuration attributes it does not know;
- the output embedding is ``lm_head.weight`` in the state dict, the converter reads ``embed_out.weight``;
- the converter builds the final LayerNorm with epsilon 1e-6 whatever ``layer_norm_eps`` says: the shim
  sets the converted model's final norm to the configured epsilon.

The sizes are distinct on every axis, and the head dimension (48 / 4 = 12, half of it rotary) keeps the
number of rotary dimensions even, as penzai's RoPE needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from penzai import pz
from penzai.models.transformer.variants import gpt_neox, llama, mistral

import attnflow

VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE, BATCH, SEQ = 97, 48, 2, 4, 40, 3, 7
#: Mistral: 3 layers, 6 query heads in 2 key/value groups of 3, head dimension 8, width 48, a window of 4 tokens
MISTRAL = dict(vocab_size=89, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
               intermediate_size=44, max_position_embeddings=32, sliding_window=4)
MISTRAL_BATCH, MISTRAL_SEQ = 5, 9
#: Every method compared; a side that cannot compute one (its trace lacks what the method needs) leaves it out.
METHODS = ("attn_grad", "grad_rollout", "norm", "norm_residual", "alti", "value_zeroing", "effective_attention")
TOLERANCE = {"float64": 1e-9, "float32": 1e-5}
#: The float32 tolerance of value zeroing: measured 1.0e-7 on these models (a cosine distance of outputs that
#: differ little is a small difference of nearly equal float32 numbers), allowed ten times that.
VALUE_ZEROING_FLOAT32 = 1e-6
TARGET = 5  # the vocabulary logit whose gradient target= records
_UNKNOWN_TO_PENZAI = ("rope_parameters", "dtype", "to_dict")  # transformers-5 config keys the converter refuses


@contextlib.contextmanager
def transformers4_view(model: torch.nn.Module, config_attributes: dict, state_dict_aliases: dict):
    """While converting: ``model.config`` has the transformers-4 attributes the converter reads and hides the
    transformers-5 ones it refuses; ``model.state_dict()`` also has the transformers-4 key names."""
    config = model.config
    added = [name for name in config_attributes if name not in vars(config)]
    to_dict, state_dict = config.to_dict, model.state_dict
    vars(config).update(config_attributes)

    def old_to_dict() -> dict:
        found = to_dict()
        for name in (*_UNKNOWN_TO_PENZAI, *config_attributes):
            found.pop(name, None)
        return found

    def old_state_dict(*args, **kwargs) -> dict:
        found = state_dict(*args, **kwargs)
        for new, old in state_dict_aliases.items():
            found.setdefault(old, found[new])
        return found

    vars(config)["to_dict"], vars(model)["state_dict"] = old_to_dict, old_state_dict
    try:
        yield model
    finally:
        del vars(config)["to_dict"], vars(model)["state_dict"]
        for name in added:
            del vars(config)[name]


def gpt_neox_from_hf(model: transformers.GPTNeoXForCausalLM) -> pz.nn.Layer:
    """penzai's GPT-NeoX converter, under transformers 5."""
    rope = model.config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"penzai's converter only does default RoPE, not {rope}")
    old = {"rotary_emb_base": rope["rope_theta"], "rotary_pct": rope.get("partial_rotary_factor", 1.0)}
    with transformers4_view(model, old, {"lm_head.weight": "embed_out.weight"}):
        converted = gpt_neox.gpt_neox_from_huggingface_model(model)
    epsilon = model.config.layer_norm_eps  # the final norm sits before the output projection
    return (pz.select(converted).at(lambda m: m.body.sublayers[-2]).at_instances_of(pz.nn.Standardize)
            .apply(lambda standardize: dataclasses.replace(standardize, epsilon=epsilon)))


def mistral_from_hf(model: transformers.PreTrainedModel) -> pz.nn.Layer:
    """penzai's Llama / Mistral converter under transformers 5 (``rope_theta`` moved into ``rope_parameters``)."""
    convert = mistral.mistral_from_huggingface_model if isinstance(model, transformers.MistralForCausalLM) \
        else llama.llama_from_huggingface_model
    with transformers4_view(model, {"rope_theta": model.config.rope_parameters["rope_theta"]}, {}):
        return convert(model)


def to_float64(converted: pz.nn.Layer, hf_model: torch.nn.Module) -> pz.nn.Layer:
    """penzai's float32 conversion of ``hf_model`` in float64 (call with jax's float64 enabled): parameters upcast,
    the query scale and the norms' epsilon recomputed in float64 from the Hugging Face configuration."""
    config = hf_model.config
    epsilon = getattr(config, "rms_norm_eps", None) or config.layer_norm_eps
    scale = (config.hidden_size // config.num_attention_heads) ** -0.5

    model = pz.select(converted).at_instances_of(pz.Parameter).apply(
        lambda parameter: pz.Parameter(value=parameter.value.astype(jnp.float64), label=parameter.label))
    model = pz.select(model).at_instances_of(pz.nn.ConstantRescale).apply(
        lambda rescale: dataclasses.replace(rescale, by=jnp.asarray(scale, jnp.float64)))
    for norm in (pz.nn.RMSStandardize, pz.nn.Standardize):
        model = pz.select(model).at_instances_of(norm).apply(
            lambda layer: dataclasses.replace(layer, epsilon=jnp.asarray(epsilon, jnp.float64)
                                              if isinstance(layer.epsilon, jax.Array) else epsilon))
    return pz.select(model).at_instances_of(jax.Array).apply(
        lambda array: array.astype(jnp.float64) if array.dtype == jnp.float32 else array)


@contextlib.contextmanager
def hf_in_float64(model: torch.nn.Module):
    """While capturing a float64 Hugging Face model: its RoPE, RMSNorm and attention softmax run in float64.
    transformers computes these three in float32 whatever the model's dtype (for half precision), which would
    leave float32 rounding (about 1e-8) in a float64 comparison; here they compute the same expressions in the
    model's dtype (instance attributes on the rotary and norm modules, and ``F.softmax``'s ``dtype=float32``
    dropped for float64 input), all put back afterwards."""
    softmax = torch.nn.functional.softmax

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):  # noqa: A002 - torch's own signature
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = None
        return softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    patched = []
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RotaryEmbedding"):
            vars(module)["forward"] = lambda x, position_ids, module=module: _rope64(module, x, position_ids)
        elif kind.endswith("RMSNorm"):
            vars(module)["forward"] = lambda hidden, module=module: module.weight * (
                hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + module.variance_epsilon))
        else:
            continue
        patched.append(module)
    torch.nn.functional.softmax = softmax64
    try:
        yield model
    finally:
        torch.nn.functional.softmax = softmax
        for module in patched:
            del vars(module)["forward"]


def _rope64(module: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple:
    """The default RoPE's ``(cos, sin)`` as transformers computes them, in float64."""
    config = module.config
    rope = config.rope_parameters
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * module.attention_scaling).to(x.dtype), (emb.sin() * module.attention_scaling).to(x.dtype)


def hf_gpt_neox() -> transformers.GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE, max_position_embeddings=32, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5},
    )
    hf_model = transformers.GPTNeoXForCausalLM(config).eval()  # default sdpa: the adapter switches to eager
    with torch.no_grad():  # random norms, so that a wrong epsilon or bias would show
        for name, parameter in hf_model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return hf_model


def hf_mistral() -> transformers.MistralForCausalLM:
    torch.manual_seed(1)
    config = transformers.MistralConfig(**MISTRAL, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    hf_model = transformers.MistralForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return hf_model


def padded_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the real-token mask: item ``i`` (odd) ends in ``i`` padding tokens (at most ``seq - 2``)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, seq))
    real = np.ones((batch, seq), dtype=bool)
    for item in range(1, batch, 2):
        real[item, seq - min(item, seq - 2):] = False
    return ids, real


def penzai_inputs(ids: np.ndarray, real: np.ndarray) -> tuple[tuple, dict]:
    """penzai's call convention: named tokens, and token positions that are negative for padding."""
    tokens = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
    positions = pz.nx.wrap(jnp.asarray(np.where(real, np.arange(ids.shape[1]), -1))).tag("batch", "seq")
    return (tokens,), {"token_positions": positions}


def capture_pair(hf_model: torch.nn.Module, penzai_model: pz.nn.Layer, ids: np.ndarray, real: np.ndarray,
                 methods: Sequence[str] = METHODS) -> tuple[attnflow.AttentionTrace, attnflow.AttentionTrace]:
    """Both sides captured on the same batch, each with what ``methods`` need."""
    wanted = {"values": any(m in methods for m in ("norm", "norm_residual", "alti", "effective_attention")),
              "value_zeroing": "value_zeroing" in methods}
    target = {"target": TARGET} if any(m in methods for m in ("attn_grad", "grad_rollout")) else {}
    in_float64 = hf_in_float64(hf_model) if hf_model.dtype == torch.float64 else contextlib.nullcontext()
    with in_float64:
        torch_trace = attnflow.capture(hf_model, input_ids=torch.from_numpy(ids),
                                       attention_mask=torch.from_numpy(real.astype(np.int64)), **target,
                                       **wanted)
    args, kwargs = penzai_inputs(ids, real)
    jax_trace = attnflow.capture(penzai_model, *args, **kwargs, **target, **wanted)
    return torch_trace, jax_trace


def method_differences(a: attnflow.AttentionTrace, b: attnflow.AttentionTrace,
                       methods: Sequence[str] = METHODS) -> dict[str, float]:
    """Method -> the max difference of its scores after every layer, every item and token, for the methods both
    traces can compute."""
    both = [m for m in methods if computable(a, m) and computable(b, m)]
    ea, eb = attnflow.explain(a, both, all_layers=True), attnflow.explain(b, both, all_layers=True)
    return {m: float(np.abs(np.asarray(ea[m], np.float64) - np.asarray(eb[m], np.float64)).max()) for m in both}


def computable(trace: attnflow.AttentionTrace, method: str) -> bool:
    try:
        attnflow.explain(trace, [method], sources=[0], all_layers=False)
    except attnflow.MethodError:
        return False
    return True


def compare(name: str, hf_model: torch.nn.Module, penzai_model: pz.nn.Layer, ids: np.ndarray,
            real: np.ndarray, dtype: str) -> dict[str, float]:
    """Every comparison of one model in one dtype: ``attention``, ``rollout``, ``flow`` and each method."""
    torch_trace, jax_trace = capture_pair(hf_model, penzai_model, ids, real)
    assert {layer.source_dtype for layer in (*torch_trace.layers, *jax_trace.layers)} == {dtype}, name
    report = attnflow.compare(torch_trace, jax_trace)  # the dtype's default tolerance
    found = {"attention": max(layer.max_abs for layer in report.layers), "rollout": report.rollout_max_abs,
             "flow": float(report.flow_max_abs or 0.0)}
    found.update(method_differences(torch_trace, jax_trace))
    if not np.array_equal(torch_trace.mask, jax_trace.mask):
        found["mask"] = float("inf")
    return found


def tolerance(method: str, dtype: str) -> float:
    if dtype == "float64":
        return TOLERANCE[dtype]
    return VALUE_ZEROING_FLOAT32 if method == "value_zeroing" else TOLERANCE[dtype]


def models(dtype: str) -> dict[str, tuple[torch.nn.Module, pz.nn.Layer, np.ndarray, np.ndarray]]:
    """name -> (Hugging Face model, penzai's conversion, ids, real-token mask), in ``dtype`` (float64: call with
    jax's float64 enabled)."""
    found = {}
    for name, make, convert, (vocab, batch, seq) in (
        ("GPT-NeoX", hf_gpt_neox, gpt_neox_from_hf, (VOCAB, BATCH, SEQ)),
        ("Mistral (grouped-query)", hf_mistral, mistral_from_hf, (MISTRAL["vocab_size"], MISTRAL_BATCH, MISTRAL_SEQ)),
    ):
        hf_model = make()
        converted = convert(hf_model)
        if dtype == "float64":
            hf_model, converted = hf_model.double(), to_float64(converted, hf_model)
        found[name] = (hf_model, converted, *padded_batch(vocab, batch, seq))
    return found


def main() -> int:
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for dtype in ("float64", "float32"):
        with jax.enable_x64(dtype == "float64"):
            for name, (hf_model, converted, ids, real) in models(dtype).items():
                rows[name, dtype] = compare(name, hf_model, converted, ids, real, dtype)
    columns = ["attention", "rollout", "flow", *METHODS]
    print("| model | dtype | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    failed = []
    for (name, dtype), found in rows.items():
        cells = [f"{found[c]:.1e}" if c in found else "-" for c in columns]
        print(f"| {name} | {dtype} | " + " | ".join(cells) + " |")
        failed += [f"{name} {dtype} {k} {v:.1e}" for k, v in found.items() if not v <= tolerance(k, dtype)]
    print("(max |difference| over every layer, item, head and real token; '-': one side cannot compute it)")
    if failed:
        print("beyond tolerance:", "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

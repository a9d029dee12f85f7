"""check_method(): the invariants every method keeps, built-in or third-party, on traces the kit builds.

The traces come from tiny random Hugging Face models captured through the transformers adapter with what the
method needs (attention gradients, value vectors, value zeroing): a padded encoder batch (BERT), a padded
causal batch (GPT-2) and an encoder-decoder with cross-attention (BART), every axis a different size. Each
failed invariant is an ``AssertionError`` naming it, the method and the trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from .._errors import AdapterError
from ..methods._options import Options
from ..methods._registry import Method, get_method
from ..trace import AttentionTrace
from ._models import BATCH, DECODER_LAYERS, DECODER_TOKENS, FFN, HEADS, HIDDEN, LAYERS, TOKENS, VOCAB

#: The invariants `check_method` checks, in order.
METHOD_CHECKS = ("shapes", "finite", "padding", "row_sum", "sources", "all_layers")
"""The invariants `check_method` checks, in order."""
_TOLERANCE = 1e-9


def method_traces(method: Method | str) -> dict[str, AttentionTrace]:
    """The kit's traces, captured with what ``method`` needs: ``"encoder"`` (padded BERT batch), ``"causal"``
    (padded GPT-2 batch) and ``"encoder_decoder"`` (BART, decoder rows over encoder and decoder tokens).
    A model the method's needs cannot be captured for is left out (its family has no value path map)."""
    from ..recording._adapter import import_optional
    from ..recording._capture import capture

    resolved = get_method(method)
    torch = import_optional("torch", "torch")
    transformers = import_optional("transformers", "transformers")
    out = {}
    for name, (build, inputs) in _models(torch, transformers).items():
        model = build()
        try:
            out[name] = capture(
                model, methods=[resolved] if isinstance(method, Method) else [resolved.name], **inputs(torch)
            )
        except AdapterError:
            continue  # e.g. values of a family without a path map: the method is checked on the others
    if not out:
        raise AssertionError(f"check_method: no kit model can capture what {resolved.name!r} needs {resolved.needs}.")
    return out


def check_method(
    method: Method | str,
    traces: Mapping[str, AttentionTrace] | None = None,
    *,
    checks: Iterable[str] = METHOD_CHECKS,
    options: Options | None = None,
) -> None:
    """Hold ``method`` to the invariants every method keeps; raise ``AssertionError`` naming the first broken one.

    Invariants (`METHOD_CHECKS`): ``shapes`` (``compute`` returns ``(layers, batch, sources, tokens)``
    float arrays per input stream, 1 or every selected layer); ``finite``; ``padding`` (rows of padded
    explained tokens and columns of padded input tokens are 0); ``row_sum`` (each real row keeps the method's
    declared ``row_sum``: ``"one"``, ``"at_most_one"`` or ``"free"``, summed over every input stream);
    ``sources`` (the rows for ``sources=[0, -1]`` equal those rows of the full result); ``all_layers`` (the
    result after layer ``d`` of an all-layers run equals a run over layers ``0..d`` alone, and its last layer
    the default run).

    Args:
        method: a registered name or a [`attnflow.Method`][attnflow.Method] instance (it need not be registered).
        traces: the traces to check on (default: [`method_traces`][attnflow.testing.method_traces]).
        checks: which invariants (default all).
        options: the options every run uses (default ``Options()``; ``row_sum`` is declared for these).
    """
    resolved = get_method(method)
    unknown = sorted(set(checks) - set(METHOD_CHECKS))
    if unknown:
        raise ValueError(f"Unknown checks {unknown}; the checks are {list(METHOD_CHECKS)}.")
    options = options or Options()
    for name, trace in (traces if traces is not None else method_traces(method)).items():
        for check in METHOD_CHECKS:
            if check in checks:
                _CHECKS[check](resolved, trace, options, f"{resolved.name!r} on the {name} trace")


def _require(condition: Any, message: str) -> None:
    """The kit's assertion: an AssertionError that survives ``python -O``."""
    if not condition:
        raise AssertionError(message)


def _explain(method: Method, trace: AttentionTrace, options: Options, **kwargs: Any) -> Any:
    from .._explanation import explain

    return explain(trace, [method], options=options, **kwargs)


def _computed(method: Method, trace: AttentionTrace, options: Options) -> dict[str, np.ndarray]:
    stream = trace.default_stream()
    return method.compute(trace, options, stream=stream, sources=None, all_layers=True)


def _shapes(method: Method, trace: AttentionTrace, options: Options, where: str) -> None:
    result = _computed(method, trace, options)
    explained = trace.streams[trace.default_stream()]
    _require(isinstance(result, dict) and result, f"shapes: {where}: compute() must return a dict stream -> array.")
    depths = set()
    for stream, array in result.items():
        _require(stream in trace.streams, f"shapes: {where}: scores over unknown stream {stream!r}.")
        _require(
            isinstance(array, np.ndarray) and array.dtype.kind == "f",
            (
                f"shapes: {where}: scores over {stream!r} must be a float array, got {type(array).__name__} "
                f"{getattr(array, 'dtype', '')}."
            ),
        )
        _require(
            array.ndim == 4 and array.shape[1:] == (trace.batch_size, explained.length, trace.streams[stream].length),
            (
                f"shapes: {where}: scores over {stream!r} have shape {array.shape}, expected (layers, "
                f"{trace.batch_size}, {explained.length}, {trace.streams[stream].length})."
            ),
        )
        depths.add(array.shape[0])
    _require(len(depths) == 1, f"shapes: {where}: the input streams' scores have different layer counts {depths}.")


def _finite(method: Method, trace: AttentionTrace, options: Options, where: str) -> None:
    for stream, array in _computed(method, trace, options).items():
        _require(np.isfinite(array).all(), f"finite: {where}: scores over {stream!r} hold NaN or infinity.")


def _padding(method: Method, trace: AttentionTrace, options: Options, where: str) -> None:
    explained = trace.default_stream()
    for stream, array in _computed(method, trace, options).items():
        for b in range(trace.batch_size):
            rows = ~_real(trace, explained, b)
            cols = ~_real(trace, stream, b)
            _require(
                not array[:, b][:, rows].any(),
                (
                    f"padding: {where}: item {b} has scores on padded explained tokens {np.flatnonzero(rows).tolist()} "
                    f"(over {stream!r}); padded rows must be 0."
                ),
            )
            _require(
                not array[:, b][:, :, cols].any(),
                (
                    f"padding: {where}: item {b} gives scores to padded {stream!r} tokens {np.flatnonzero(cols).tolist()}; "
                    "padded columns must be 0."
                ),
            )


def _real(trace: AttentionTrace, stream: str, item: int) -> np.ndarray:
    """``(length,)`` True at the item's real tokens of ``stream``."""
    real = np.zeros(trace.streams[stream].length, dtype=np.bool_)
    real[trace.valid_index(item, stream)] = True
    return real


def _row_sum(method: Method, trace: AttentionTrace, options: Options, where: str) -> None:
    if method.row_sum == "free":
        return
    result = _computed(method, trace, options)
    explained = trace.streams[trace.default_stream()]
    total = sum(array.sum(-1) for array in result.values())
    lowest = min(float(array.min()) for array in result.values())
    _require(lowest >= -_TOLERANCE, f"row_sum: {where}: declared {method.row_sum!r} but a score is {lowest:.3g} < 0.")
    for b in range(trace.batch_size):
        sums = total[:, b][:, _real(trace, explained.name, b)]
        if method.row_sum == "one":
            worst = float(np.abs(sums - 1).max())
            _require(worst <= 1e-6, f"row_sum: {where}: declared 'one' but item {b}'s rows are off by {worst:.3g}.")
        else:
            _require(
                float(sums.max()) <= 1 + 1e-6,
                (
                    f"row_sum: {where}: declared 'at_most_one' but item {b} has a row summing to {float(sums.max()):.6g}."
                ),
            )


def _sources(method: Method, trace: AttentionTrace, options: Options, where: str) -> None:
    full = _explain(method, trace, options, all_layers=False)
    some = _explain(method, trace, options, sources=[0, -1], all_layers=False)
    for stream in full.input_streams:
        whole = full.scores(method.name, stream)
        rows = some.scores(method.name, stream)
        for b in range(trace.batch_size):
            for s, position in enumerate(some.sources[b]):
                difference = float(np.abs(rows[b, s] - whole[b, position]).max())
                _require(
                    difference <= _TOLERANCE * max(1.0, float(np.abs(whole[b]).max())),
                    (
                        f"sources: {where}: the row for token {int(position)} of item {b} differs by {difference:.3g} "
                        f"from that row of the full result (over {stream!r})."
                    ),
                )


def _all_layers(method: Method, trace: AttentionTrace, options: Options, where: str) -> None:
    every = _explain(method, trace, options, all_layers=True)
    indices = every.layer_indices(method.name)
    runs = [(-1, indices[-1], _explain(method, trace, options, all_layers=False))]
    if len(indices) > 1:
        runs += [(d, index, _explain(method, trace, options.replace(layers=(0, index + 1)), all_layers=False))
                 for d, index in enumerate(indices[:-1])]
    for d, index, alone in runs:
        for stream in every.input_streams:  # a stream the single run has no scores over must have none here
            mine = every.scores(method.name, stream, layer=d)
            theirs = alone.scores(method.name, stream) if stream in alone.input_streams else np.zeros_like(mine)
            _close(mine, theirs, f"all_layers: {where}: layer {index} of the all-layers run differs from a run over "
                                 f"layers 0..{index} alone (over {stream!r})")


def _close(a: np.ndarray, b: np.ndarray, message: str) -> None:
    difference = float(np.abs(a - b).max()) if a.size else 0.0
    _require(
        a.shape == b.shape and difference <= _TOLERANCE * max(1.0, float(np.abs(b).max(initial=0.0))),
        (f"{message}: max difference {difference:.3g}."),
    )


_CHECKS: dict[str, Callable[[Method, AttentionTrace, Options, str], None]] = {
    "shapes": _shapes,
    "finite": _finite,
    "padding": _padding,
    "row_sum": _row_sum,
    "sources": _sources,
    "all_layers": _all_layers,
}


def _models(torch: Any, transformers: Any) -> dict[str, tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]]:
    """The kit's models (fresh, eval, eager) and their padded inputs; sizes from `attnflow.testing.models`."""

    def bert() -> Any:
        torch.manual_seed(11)
        return transformers.BertModel(
            transformers.BertConfig(
                vocab_size=VOCAB,
                hidden_size=HIDDEN,
                num_hidden_layers=LAYERS,
                num_attention_heads=HEADS,
                intermediate_size=FFN,
                max_position_embeddings=16,
                initializer_range=0.3,
            )
        ).eval()

    def gpt2() -> Any:
        torch.manual_seed(12)
        return transformers.GPT2Model(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=HIDDEN,
                n_layer=LAYERS,
                n_head=HEADS,
                n_inner=FFN,
                n_positions=16,
                initializer_range=0.3,
            )
        ).eval()

    def bart() -> Any:
        torch.manual_seed(13)
        return transformers.BartModel(
            transformers.BartConfig(
                vocab_size=VOCAB,
                d_model=HIDDEN,
                encoder_layers=LAYERS,
                decoder_layers=DECODER_LAYERS,
                encoder_attention_heads=HEADS,
                decoder_attention_heads=HEADS,
                encoder_ffn_dim=FFN,
                decoder_ffn_dim=FFN,
                max_position_embeddings=16,
                pad_token_id=0,
                init_std=0.3,
            )
        ).eval()

    def tokens(torch: Any, length: int, seed: int, short: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (BATCH, length), generator=generator)
        mask = torch.ones(BATCH, length, dtype=torch.long)
        mask[1, short:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    def seq2seq(torch: Any) -> dict[str, Any]:
        encoder, decoder = tokens(torch, TOKENS, 3, 5), tokens(torch, DECODER_TOKENS, 4, 4)
        return {
            **encoder,
            "decoder_input_ids": decoder["input_ids"],
            "decoder_attention_mask": decoder["attention_mask"],
        }

    return {
        "encoder": (bert, lambda torch: tokens(torch, TOKENS, 1, 5)),
        "causal": (gpt2, lambda torch: tokens(torch, TOKENS, 2, 4)),
        "encoder_decoder": (bart, seq2seq),
    }

"""faithfulness(): does an explanation agree with what the model itself is sensitive to?"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import AdapterError, OptionError
from .._explanation import Explanation
from ..recording._adapter import Adapter
from ..recording._registry import find_adapter
from ._leaderboard import check_seed
from ._probe import BLANKS, Probe, ProbeRequest, resolve_target
from ._report import RANDOM, FaithfulnessReport
from ._stats import CURVE_GRID, ERASER_BINS, ranking, snap, spearman, steps

#: Reference importances and the adapter capability each needs.
REFERENCES = {"blankout": "ablation", "grad_norm": "input_gradients", "grad_x_input": "input_gradients",
              "grad_norm_proj": "input_gradients"}
"""Reference importances and the adapter capability each needs."""
#: The references computed by default: every one but ``grad_norm_proj`` (the cheap stand-in for ``grad_norm``
#: on vector targets, asked for by name).
DEFAULT_REFERENCES = ("blankout", "grad_norm", "grad_x_input")
"""The references computed by default: every one but ``grad_norm_proj`` (the cheap stand-in for ``grad_norm``
on vector targets, asked for by name)."""
#: References that need the Jacobian of a vector target (one backward pass per output dimension).
JACOBIAN_REFERENCES = ("grad_norm", "grad_x_input")


def faithfulness(
    model: Any,
    explanation: Explanation,
    *args: Any,
    target: Any = None,
    target_position: int | None = None,
    blank: str | int = "mask",
    tokenizer: Any = None,
    references: Sequence[str] | None = None,
    source: int | str | None = None,
    special: bool = False,
    signed: bool = False,
    curves: bool = True,
    bins: Sequence[float] = ERASER_BINS,
    grid: Sequence[float] = CURVE_GRID,
    seed: int = 0,
    embedding: Any = None,
    adapter: str | Adapter | None = None,
    adapter_options: Mapping[str, Any] | None = None,
    max_rows: int = 256,
    notice: Callable[[str], None] | None = None,
    **model_kwargs: Any,
) -> FaithfulnessReport:
    """Compare ``explanation``'s token scores with the model's own sensitivity to its input tokens.

    ``model(*args, **model_kwargs)`` must be the call the explanation's trace was captured from (same items,
    same padding). Reference importances of each input token ``j`` of each item, for one target score ``s``:

    - ``blankout``: ``s(x) − s(x with token j blanked out)`` (Abnar & Zuidema's ablation), all ``n`` variants
      of an item run as batches;
    - ``grad_norm``: ``‖∂s/∂e_j‖₂`` and ``grad_x_input``: ``∂s/∂e_j · e_j`` (``e_j``: token j's input
      embedding). For a vector target (the embedding of a model without logits) these are norms of the
      Jacobian ``∂v/∂e_j`` projected off the unablated direction: exact, but one backward pass per output
      dimension (384 on all-MiniLM-L6-v2), batched into one vectorised backward;
    - ``grad_norm_proj`` (asked for by name): ``‖∂s/∂e_j‖₂`` of the projection ``s(x) = ⟨v(x), v(x₀)/‖v(x₀)‖⟩``
      of a vector target on its unablated direction: one backward pass (the cosine's own gradient is 0 at
      ``x₀``, its projection's is not). For a scalar target it equals ``grad_norm``.

    Each method's scores for the explained output are ranked against each reference per item and layer
    (Spearman's ρ), and the tokens are removed in the method's order for deletion/insertion curves and
    ERASER's comprehensiveness and sufficiency (AOPC: see below). A random ranking of each item's tokens (``seed``)
    is reported beside the methods as ``"random"``: the baseline a method has to beat.

    Args:
        model: the model (PyTorch, transformers, Flax), through an adapter declaring ``"ablation"`` (blank-out,
            curves) and ``"input_gradients"`` (gradients).
        explanation: from [`attnflow.explain`][attnflow.explain] on a trace of this call; use ``all_layers=True`` for a
            correlation per layer (flow computes only the last layer by default).
        *args: the model's positional inputs.
        **model_kwargs: the model's keyword inputs (e.g. ``input_ids=..., attention_mask=...``).
        target: the score explained: None (each item's argmax logit, held fixed over the variants; for models
            without logits, such as a sentence-embedding model, ``"embedding"``), an int logit index, a list of
            one index per item (e.g. the true labels), ``"logits"``, ``"embedding"`` (the cosine similarity of the
            mean-pooled last hidden state over the real tokens to the unablated one), or a callable
            ``target(output)`` / ``target(output, items)`` returning ``(rows,)`` scores or ``(rows, dim)``
            vectors (compared by cosine to the unablated ones); ``items[r]`` is the item row ``r`` is a variant of.
        target_position: where per-token logits are read (default: each item's last real token for decoders,
            the mask token for a masked language model's input with one, else position 0).
        blank: how a token is blanked out: ``"mask"`` (the tokenizer's or model's mask token), ``"unk"`` (the
            unknown token, as in the paper), ``"zero"`` (its input embedding set to zero) or a token id.
        tokenizer: where the mask and unknown token ids are read (default: the model's config).
        references: which references to compute (default: all the adapter can).
        source: which explained token's scores are compared: an int position (negative: from each item's last
            real token), ``"mean"`` (the mean over every real explained token, for embedding targets; needs an
            explanation of all tokens), or None (the only one; the mean for embedding targets; else the token
            the target reads).
        special: whether special tokens ([CLS], [SEP]) are among the tokens compared and removed. Default
            False: left out of both the correlations and the removal curves, as ERASER does (Abnar & Zuidema
            kept them; on all-MiniLM-L6-v2 raw attention, rollout and flow rank [CLS] first in every sentence
            while blank-out ranks it last, which dominates the correlations).
        signed: compare with the signed references (a token that argues against the target ranks low);
            default: their absolute values (attention scores say how much, not which way).
        curves: compute deletion/insertion curves and AOPC (more forward passes: about ``2 × len(grid ∪ bins)``
            per method and item).
        bins: ERASER's fractions of tokens for AOPC; grid: the fractions at which the curves are read.
            AOPC is the **mean over the bins** ``B``: comprehensiveness ``(1/|B|) Σ_k (s(x) − s(x ∖ top_k))``,
            sufficiency ``(1/|B|) Σ_k (s(x) − s(top_k))``, as ERASER's released scorer computes it
            (``_instances_aopc`` in ``rationale_benchmark/metrics.py`` of github.com/jayded/eraserbenchmark
            takes ``np.average`` over the per-threshold differences). The paper's printed formula (DeYoung et al., 2020, "ERASER: A Benchmark to Evaluate
            Rationalized NLP Models", ACL, §4.2) has ``1/(|B|+1)`` instead: multiply attnflow's values by
            ``|B|/(|B|+1)`` (5/6 for the default five bins) to compare with numbers computed that way; the
            ranking of methods is the same either way.
        seed: the seed of the random ranking, and of the random order in which tied scores are removed.
        embedding: the module giving input embeddings (a module, or its path) when the adapter cannot find it.
        adapter: as for [`attnflow.capture`][attnflow.recording.capture].
        adapter_options: as for [`attnflow.capture`][attnflow.recording.capture].
        max_rows: input rows per forward pass.
        notice: called with a sentence about a costly step before it starts (the Jacobian of a vector
            target); default: nothing is said.

    Returns:
        A [`FaithfulnessReport`][attnflow.evaluate.FaithfulnessReport] (``.spearman[method][reference]`` per layer, ``.aopc``, ``.curves``,
        ``.to_frame()``).

    Raises:
        OptionError: bad settings, a blank token the model lacks, an explanation of other inputs.
        AdapterError: the model's adapter cannot blank out tokens or take input gradients.
    """
    if not isinstance(explanation, Explanation):
        raise OptionError(f"explanation must be an attnflow.Explanation (attnflow.explain(trace, ...)), got "
                          f"{type(explanation).__name__}.")
    stream = _explained_stream(explanation)
    if not (isinstance(blank, str) and blank in BLANKS) and not _is_token_id(blank):
        raise OptionError(f"blank must be one of {BLANKS} or a token id, got {blank!r}.")
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise OptionError(f"max_rows must be a positive int, got {max_rows!r}.")
    check_seed(seed)
    chosen = find_adapter(model, adapter, adapter_options)
    names = _references(references, chosen, curves)
    make_probe = getattr(chosen, "probe", None)
    if make_probe is None:
        raise AdapterError(
            f"Adapter {chosen.name!r} declares {sorted(set(chosen.captures) & {'ablation', 'input_gradients'})} but "
            "has no probe(model, request, *args, **kwargs) method; see docs/faithfulness.md."
        )
    request = ProbeRequest(
        target=resolve_target(target, stream.mask.shape[0]), target_position=target_position, blank=blank,
        tokenizer=tokenizer, mask=np.asarray(stream.mask, bool), causal=bool(stream.causal), embedding=embedding,
        max_rows=max_rows, gradients=any(REFERENCES[n] == "input_gradients" for n in names), references=names,
    )
    probe = make_probe(model, request, *args, **model_kwargs)
    try:
        settings = {"adapter": chosen.name, "blank": blank if isinstance(blank, str) else int(blank)}
        return evaluate_probe(probe, explanation, references=names, source=source, special=special, signed=signed,
                              curves=curves, bins=bins, grid=grid, seed=seed, settings=settings, notice=notice)
    finally:
        probe.close()


def evaluate_probe(
    probe: Probe, explanation: Explanation, *, references: Sequence[str] = DEFAULT_REFERENCES,
    source: int | str | None = None, special: bool = False, signed: bool = False, curves: bool = True,
    bins: Sequence[float] = ERASER_BINS, grid: Sequence[float] = CURVE_GRID, seed: int = 0,
    settings: Mapping[str, Any] | None = None, notice: Callable[[str], None] | None = None,
) -> FaithfulnessReport:
    """The framework-free part of [`faithfulness`][attnflow.evaluate.faithfulness], on a probe made by an adapter (or by hand)."""
    check_seed(seed)
    stream = _explained_stream(explanation)
    mask = np.asarray(stream.mask, bool)
    batch, length = mask.shape
    base = np.asarray(probe.base, dtype=np.float64)
    if base.shape != (batch,):
        raise OptionError(f"The probe scored {base.shape[0] if base.ndim else 0} items; the explanation has {batch}.")
    compared = mask if special else mask & ~np.asarray(stream.special, bool)
    bins, grid = _fractions(bins, "bins"), _fractions(grid, "grid")
    reduce, source_text = _source_rows(explanation, probe, source, mask)
    scores = {method: reduce(explanation.layers(method)) for method in explanation.methods}  # (layers, B, T)
    scores = {method: np.where(compared, snap(np.where(compared, values, 0.0)), 0.0) for method, values in scores.items()}

    importances = _importances(probe, references, compared, base, notice)
    rng = np.random.default_rng(seed)
    all_layers = sorted({i for m in explanation.methods for i in explanation.layer_indices(m)})
    scores[RANDOM] = rng.random((len(all_layers), batch, length))
    tiebreak = rng.random((batch, length))  # ties in a method's ranking fall in a random order, the same for all
    layers = {m: explanation.layer_indices(m) for m in explanation.methods} | {RANDOM: tuple(all_layers)}

    correlations: dict[str, dict[str, np.ndarray]] = {}
    for method, values in scores.items():
        correlations[method] = {}
        for name in references:
            reference = importances[name] if signed else np.abs(importances[name])
            out = np.full((values.shape[0], batch), np.nan)
            for b in range(batch):
                where = np.flatnonzero(compared[b])
                if where.size >= 2:
                    out[:, b] = spearman(values[:, b, where], reference[b, where])
            correlations[method][name] = out

    comprehensiveness: dict[str, np.ndarray] = {}
    sufficiency: dict[str, np.ndarray] = {}
    item_curves: dict[str, dict[str, np.ndarray]] = {}
    if curves:
        comprehensiveness, sufficiency, item_curves = _curves(
            probe, {m: v[-1] for m, v in scores.items()}, compared, base, bins, grid, tiebreak)
    return FaithfulnessReport(
        layers=layers, references=references, correlations=correlations, comprehensiveness=comprehensiveness,
        sufficiency=sufficiency, item_curves=item_curves, grid=grid, bins=bins, importances=importances, base=base,
        settings={**dict(settings or {}), "target": probe.target.describe(), "source": source_text,
                  "special": bool(special), "signed": bool(signed), "seed": int(seed),
                  "model": explanation.model_name, "stream": explanation.stream},
    )


# -- pieces ---------------------------------------------------------------------------------------------
def _explained_stream(explanation: Explanation) -> Any:
    if explanation.input_streams != [explanation.stream]:
        raise OptionError(
            f"faithfulness compares scores over the explained stream's own input tokens; this explanation of "
            f"{explanation.stream!r} draws on {explanation.input_streams} (an encoder-decoder or two towers), which "
            "is not supported. Explain a single-stream model (or one tower, stream=...)."
        )
    return explanation.streams[explanation.stream]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and bool(value >= 0)


def _references(references: Sequence[str] | None, adapter: Adapter, curves: bool) -> tuple[str, ...]:
    captures = set(adapter.captures)
    if references is None:
        names = tuple(n for n in DEFAULT_REFERENCES if REFERENCES[n] in captures)
        if not names:
            raise AdapterError(
                f"Adapter {adapter.name!r} can neither blank tokens out nor take input gradients (it captures "
                f"{sorted(captures)}; faithfulness needs 'ablation' or 'input_gradients'). Use an adapter that "
                "declares them (transformers, torch)."
            )
    else:
        names = (references,) if isinstance(references, str) else tuple(references)
        unknown = [n for n in names if n not in REFERENCES]
        if unknown or not names or len(set(names)) != len(names):
            raise OptionError(f"references must name some of {list(REFERENCES)} once each, got {list(names)}.")
        missing = sorted({REFERENCES[n] for n in names} - captures)
        if missing:
            raise AdapterError(
                f"Adapter {adapter.name!r} cannot compute {[n for n in names if REFERENCES[n] in missing]}: it does "
                f"not declare {missing}. Leave them out with references=[...]."
            )
    if curves and "ablation" not in captures:
        raise AdapterError(
            f"Adapter {adapter.name!r} cannot blank tokens out ('ablation'), which the deletion/insertion curves "
            "need; pass curves=False."
        )
    return names


def _fractions(values: Sequence[float], what: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be fractions in [0, 1], got {values!r}.") from None
    if not out or any(not 0.0 <= v <= 1.0 for v in out):
        raise OptionError(f"{what} must be fractions in [0, 1], got {values!r}.")
    return out


def _source_rows(explanation: Explanation, probe: Probe, source: Any, mask: np.ndarray) -> tuple[Any, str]:
    """A function from ``(layers, batch, sources, tokens)`` to the compared ``(layers, batch, tokens)``, and a
    description of which rows it takes."""
    positions = explanation.sources  # (batch, S)
    batch, count = positions.shape
    if source is None:
        if count == 1:
            first = positions[:, 0]
            return (lambda a: a[:, :, 0]), (f"position {int(first[0])}" if (first == first[0]).all()
                                             else "the explained token")
        if probe.vector:
            source = "mean"
        elif probe.positions is not None:
            wanted = np.asarray(probe.positions, dtype=np.int64)
            return _pick(positions, wanted, "the target's position"), "the target's position"
        else:
            raise OptionError(
                f"The explanation has {count} explained tokens per item and the target reads none in particular; "
                "say which to compare with source=POSITION (e.g. 0 for [CLS]; --source 0 on the command line) or "
                "source='mean', or explain one token (explain(trace, ..., sources=[0]))."
            )
    if isinstance(source, str):
        if source != "mean":
            raise OptionError(f"source must be a position, 'mean' or None, got {source!r}.")
        if explanation.requested_sources is not None:
            raise OptionError(
                "source='mean' averages over every explained token, but this explanation covers only the sources "
                f"{explanation.requested_sources}; explain all tokens (sources=None)."
            )
        weights = mask[np.arange(batch)[:, None], positions].astype(np.float64)  # real explained tokens only
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
        return (lambda a: np.einsum("lbst,bs->lbt", a, weights)), "mean over the explained tokens"
    if not isinstance(source, (int, np.integer)) or isinstance(source, bool):
        raise OptionError(f"source must be a position, 'mean' or None, got {source!r}.")
    wanted = np.zeros(batch, dtype=np.int64)
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        if not -real.size <= source < mask.shape[1] or (source < 0 and real.size == 0):
            raise OptionError(f"source={source} is outside item {b}'s tokens.")
        wanted[b] = source if source >= 0 else real[source]
    return _pick(positions, wanted, f"source={source}"), f"position {int(source)}"


def _pick(positions: np.ndarray, wanted: np.ndarray, what: str) -> Any:
    rows = np.zeros(positions.shape[0], dtype=np.int64)
    for b, position in enumerate(wanted):
        hits = np.flatnonzero(positions[b] == position)
        if hits.size == 0:
            raise OptionError(
                f"The explanation has no scores for position {int(position)} of item {b} ({what}); it explains "
                f"positions {positions[b].tolist()}. Explain that token (sources=[...]) or all tokens."
            )
        rows[b] = hits[0]
    return lambda a: a[:, np.arange(positions.shape[0]), rows]


def _importances(probe: Probe, references: Sequence[str], compared: np.ndarray, base: np.ndarray,
                 notice: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    batch, length = compared.shape
    out: dict[str, np.ndarray] = {}
    if "blankout" in references:
        items, columns = np.nonzero(compared)
        blanked = np.zeros((items.size, length), bool)
        blanked[np.arange(items.size), columns] = True
        values = np.full((batch, length), np.nan)
        if items.size:
            values[items, columns] = base[items] - np.asarray(probe.scores(items, blanked), dtype=np.float64)
        out["blankout"] = values
    wanted = [name for name in references if REFERENCES[name] == "input_gradients"]
    if wanted:
        size = probe.jacobian_size()
        jacobian = [name for name in wanted if name in JACOBIAN_REFERENCES]
        if size and jacobian and notice is not None:
            notice(
                f"{' and '.join(jacobian)} of this vector target ({size} dimensions) need its Jacobian: {size} backward "
                f"passes per item (batched), about {size}x the gradient of a scalar target; the reference "
                "grad_norm_proj (the gradient of the projection on the unablated direction) needs one."
            )
        gradients = dict(probe.gradients())
        if "grad_norm_proj" in wanted and "grad_norm_proj" not in gradients:
            if size:
                raise OptionError(
                    f"The probe ({type(probe).__name__}) does not compute grad_norm_proj for a vector target; leave "
                    "it out of references=."
                )
            gradients["grad_norm_proj"] = gradients["grad_norm"]  # a scalar target is its own projection
        for name in wanted:
            if name in references:
                array = np.asarray(gradients[name], dtype=np.float64)
                if array.shape != (batch, length):
                    raise OptionError(f"The probe's {name} has shape {array.shape}, expected {(batch, length)}.")
                out[name] = np.where(compared, array, np.nan)
    return {name: out[name] for name in references}


def _curves(
    probe: Probe, final: Mapping[str, np.ndarray], compared: np.ndarray, base: np.ndarray,
    bins: tuple[float, ...], grid: tuple[float, ...], tiebreak: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Deletion/insertion curves and AOPC from each method's last-layer scores ``(batch, tokens)``."""
    batch, length = compared.shape
    plans: dict[tuple[str, int], tuple[np.ndarray, list[int], list[int], list[list[tuple[int, int]]]]] = {}
    rows: dict[tuple[int, bytes], int] = {}
    row_items: list[int] = []
    row_masks: list[np.ndarray] = []

    def row_of(b: int, blanked: np.ndarray) -> int:
        if not blanked.any():
            return -1 - b  # the unablated input: its score is the probe's base
        key = (b, np.packbits(blanked).tobytes())
        if key not in rows:
            rows[key] = len(row_items)
            row_items.append(b)
            row_masks.append(blanked)
        return rows[key]

    for method, values in final.items():
        for b in range(batch):
            where = np.flatnonzero(compared[b])
            order = ranking(values[b], where, tiebreak[b])
            n = where.size
            bin_steps, grid_steps = steps(n, bins, at_least_one=True), steps(n, grid)
            deletion, insertion = [], []
            for k in sorted(set(bin_steps) | set(grid_steps)):
                removed = np.zeros(length, bool)
                removed[order[:k]] = True
                kept = np.zeros(length, bool)
                kept[order[k:]] = True  # blank all compared tokens but the top k
                deletion.append((k, row_of(b, removed)))
                insertion.append((k, row_of(b, kept)))
            plans[(method, b)] = (order, bin_steps, grid_steps, [deletion, insertion])
    values_of = np.asarray(probe.scores(np.asarray(row_items, dtype=np.int64), np.asarray(row_masks, bool).reshape(
        len(row_masks), length)), dtype=np.float64) if row_items else np.zeros(0)

    def score(index: int) -> float:
        return float(base[-1 - index]) if index < 0 else float(values_of[index])

    comprehensiveness = {m: np.full(batch, np.nan) for m in final}
    sufficiency = {m: np.full(batch, np.nan) for m in final}
    item_curves = {m: {"deletion": np.full((batch, len(grid)), np.nan), "insertion": np.full((batch, len(grid)), np.nan)}
                   for m in final}
    for (method, b), (order, bin_steps, grid_steps, (deletion, insertion)) in plans.items():
        if order.size == 0:
            continue
        after_deletion = {k: score(i) for k, i in deletion}
        after_insertion = {k: score(i) for k, i in insertion}
        comprehensiveness[method][b] = float(np.mean([base[b] - after_deletion[k] for k in bin_steps]))
        sufficiency[method][b] = float(np.mean([base[b] - after_insertion[k] for k in bin_steps]))
        item_curves[method]["deletion"][b] = [after_deletion[k] for k in grid_steps]
        item_curves[method]["insertion"][b] = [after_insertion[k] for k in grid_steps]
    return comprehensiveness, sufficiency, item_curves

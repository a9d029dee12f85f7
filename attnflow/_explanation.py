"""explain() and the Explanation it returns: the scores of several methods for one trace and one set of sources."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._errors import MethodError, OptionError
from ._tensorfile import read_tensor_file, write_tensor_file
from .methods._fusion import check_flag, select_layers, stream_layer_indices
from .methods._options import Options
from .methods._registry import ALL, SKIPPED, Method, get_method, list_methods, method_names
from .methods._sources import GeneratedSources, resolve_sources
from .network._network import explained_stream
from .trace import AttentionTrace, Stream
from .trace._file import _Fields
from .trace._trace import freeze_metadata, thaw_metadata

FORMAT = "attnflow.explanation"
FORMAT_VERSION = 1
DEFAULT_METHODS = ("raw", "rollout", "flow")


def explain(
    trace: AttentionTrace,
    methods: Iterable[str | Method] | str = DEFAULT_METHODS,
    *,
    sources: Sequence[int] | Literal["generated"] | None = None,
    stream: str | None = None,
    options: Options | None = None,
    all_layers: bool | None = None,
) -> Explanation:
    """Compute several methods on one trace, for the same output tokens and settings.

    Args:
        trace: the captured attention.
        methods: method names (see [`attnflow.list_methods`][attnflow.list_methods]), one name, or ``"all"``: every registered
            method this trace has what it needs for; those it lacks (and those the capture skipped) are listed
            in [`Explanation.skipped`][attnflow.Explanation.skipped] with the reason. An explicit list the trace cannot serve is refused
            in one [`MethodError`][attnflow.MethodError] naming every method and what it lacks.
        sources: positions of the explained stream's output tokens to explain (negative: from each item's
            last real token), or ``"generated"`` for a ``generate()`` trace (see [`attnflow.flow`][attnflow.flow]);
            default all.
        stream: the explained stream (default: [`AttentionTrace.default_stream`][attnflow.AttentionTrace.default_stream]).
        options: the settings every method reads ([`attnflow.Options`][attnflow.Options]); default the paper's.
        all_layers: compute each method after every layer (True), only the last (False), or as each method
            prefers (None: all layers for the cheap ones, the last for flow).

    Returns:
        An [`Explanation`][attnflow.Explanation]; ``explanation["rollout"]`` is ``(batch, sources, tokens)`` (a dict by input
        stream where the explained stream draws on several).

    Examples:
        >>> import numpy as np
        >>> import attnflow
        >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
        >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
        >>> explanation = attnflow.explain(trace, ["raw", "rollout"])
        >>> explanation.methods
        ('raw', 'rollout')
        >>> explanation["rollout"].shape  # (batch, sources, tokens)
        (1, 2, 2)
    """
    names = method_names(methods)
    for name in names:
        if not isinstance(name, (str, Method)):
            raise OptionError(f"methods must hold method names such as 'rollout', got {name!r}; choose from {list_methods()}.")
    if not names:
        raise OptionError(f"methods is empty; choose from {list_methods()}, or 'all'.")
    if len(set(names)) != len(names):
        raise OptionError(f"methods names a method twice: {names}.")
    everything = names == [ALL]
    if ALL in names and not everything:
        raise OptionError(f"'all' stands alone (every registered method the trace supports); got {names}.")
    check_flag("all_layers", all_layers, none=True)
    options = options if options is not None else Options()
    if not isinstance(options, Options):
        raise OptionError(f"options must be an attnflow.Options, got {type(options).__name__}.")
    explained = explained_stream(trace, stream)
    own = stream_layer_indices(trace, explained)
    chosen = [own.index(i) for i in select_layers(trace, options.layers, explained)]
    resolved, skipped = _runnable(trace, [get_method(name) for name in (list_methods() if everything else names)],
                                  everything)
    sources = resolve_sources(trace, explained, sources)
    positions = _source_positions(trace, explained, sources)
    scores: dict[str, dict[str, np.ndarray]] = {}
    layers: dict[str, list[int]] = {}
    seconds: dict[str, float] = {}
    for method in resolved:
        every = method.all_layers_by_default if all_layers is None else bool(all_layers)
        start = time.perf_counter()
        try:
            result = method.compute(trace, options, stream=explained, sources=sources, all_layers=every)
        except MethodError as exc:
            if not everything:
                raise
            skipped[method.name] = str(exc)  # e.g. a method that needs every head, on a head-fused trace
            continue
        seconds[method.name] = time.perf_counter() - start
        scores[method.name] = {name: np.asarray(value, dtype=np.float64) for name, value in result.items()}
        depth = next(iter(result.values())).shape[0]
        layers[method.name] = chosen if every and depth == len(chosen) else chosen[-1:]  # 1: no layer structure
        if depth != len(layers[method.name]):
            raise MethodError(
                f"Method {method.name!r} returned {depth} layers, expected {len(layers[method.name])} (or 1); a "
                "method's compute() returns (layers, batch, sources, tokens) arrays."
            )
    used = {explained} | {name for result in scores.values() for name in result}
    return Explanation(
        scores=scores, layers=layers, stream=explained,
        streams={name: s for name, s in trace.streams.items() if name in used},
        sources=positions, requested_sources=None if sources is None else [int(s) for s in sources],
        options=options, model_name=trace.model_name, framework=trace.framework,
        metadata={**{k: v for k, v in trace.metadata.items() if k != SKIPPED}, "seconds": seconds,
                  **({SKIPPED: skipped} if skipped else {})},
    )


def _runnable(trace: AttentionTrace, methods: list[Method], everything: bool) -> tuple[list[Method], dict[str, str]]:
    """The methods that can run on ``trace`` and, for ``"all"``, the others with the reason (what the capture
    already skipped keeps its reason). An explicit list that cannot run is refused in one error naming every
    method and what it lacks."""
    captured = trace.metadata.get(SKIPPED) or {}
    failed: dict[str, str] = {}
    for method in methods:
        if method.name in captured:
            failed[method.name] = str(captured[method.name])
            continue
        try:
            method.check(trace)
        except MethodError as exc:
            failed[method.name] = str(exc)
    if failed and not everything:
        if len(failed) == 1:
            raise MethodError(next(iter(failed.values())))
        raise MethodError(
            f"{len(failed)} of the methods asked for cannot run on this trace:\n"
            + "\n".join(f"  - {name}: {why}" for name, why in failed.items())
            + "\nCapture what they need in one go with attnflow.capture(model, ..., methods=[...]), or explain with "
              "methods='all' to run what this trace supports."
        )
    return [m for m in methods if m.name not in failed], failed


def _source_positions(trace: AttentionTrace, stream: str, sources: Sequence[int] | None) -> np.ndarray:
    """``(batch, S)`` positions of the explained tokens in the padded stream."""
    from .methods._flow import local_sources

    info = trace.streams[stream]
    if sources is None:
        return np.tile(np.arange(info.length), (trace.batch_size, 1))
    out = np.zeros((trace.batch_size, len(sources)), dtype=np.int64)
    for b in range(trace.batch_size):
        local, rows = local_sources(trace, stream, b, sources)
        valid = info.valid_index(b)
        out[b] = sources if isinstance(sources, GeneratedSources) else out[b]  # padding rows keep their position
        out[b, rows] = valid[local]
    return out


class Explanation:
    """Scores of several methods for the same trace, output tokens and settings.

    ``explanation[method]`` is the method's scores after the last layer, ``(batch, sources, tokens)``
    float64 (``[b, s, j]``: how much explained token ``s`` draws on input token ``j``), or a dict from
    input stream to such arrays where the explained stream draws on several (an encoder-decoder's
    decoder). [`layers`][attnflow.Explanation.layers] gives the per-layer ``(layers, batch, sources, tokens)`` scores.

    Attributes:
        methods: the method names, in the order they were asked for.
        stream: the explained stream.
        streams: the streams involved ([`attnflow.Stream`][attnflow.Stream]: tokens, masks...).
        sources: ``(batch, S)`` positions of the explained tokens in their stream.
        requested_sources: the ``sources=`` given (None: all tokens).
        options: the [`attnflow.Options`][attnflow.Options] used.
        model_name, framework, metadata: from the trace (``metadata["seconds"]``: time per method).

    Examples:
        >>> import numpy as np
        >>> import attnflow
        >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
        >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
        >>> explanation = attnflow.explain(trace, "rollout", all_layers=True)
        >>> explanation
        Explanation(methods=['rollout'], stream='tokens', batch=1, sources=2, inputs=['tokens'], model='')
        >>> explanation.layers("rollout").shape  # (layers, batch, sources, tokens)
        (2, 1, 2, 2)
        >>> explanation.layers("rollout")[0, 0, 1]  # after the first layer, token "b"
        array([0.25, 0.75])
    """

    def __init__(
        self, *, scores: Mapping[str, Mapping[str, np.ndarray]], layers: Mapping[str, Sequence[int]], stream: str,
        streams: Mapping[str, Stream], sources: np.ndarray, requested_sources: Sequence[int] | None,
        options: Options, model_name: str = "", framework: str = "", metadata: Mapping[str, Any] | None = None,
        source_labels: Sequence[Sequence[str]] | None = None,
    ):
        self._scores = {m: {s: _read_only(a) for s, a in by_stream.items()} for m, by_stream in scores.items()}
        self._layers = {m: tuple(int(i) for i in v) for m, v in layers.items()}
        self.stream = stream
        self.streams = dict(streams)
        self.sources = _read_only(np.asarray(sources, dtype=np.int64))
        self.requested_sources = None if requested_sources is None else list(requested_sources)
        self.options = options
        self.model_name = model_name
        self.framework = framework
        self.metadata = freeze_metadata(metadata)
        if source_labels is None:
            labels = self.streams[stream].tokens or ()
            source_labels = [[labels[b][p] for p in row] for b, row in enumerate(self.sources.tolist())]
        self._source_labels = tuple(tuple(str(t) for t in row) for row in source_labels)
        self._check()

    # -- reading ------------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The methods computed, in the order they were asked for."""
        return tuple(self._scores)

    @property
    def skipped(self) -> dict[str, str]:
        """Methods of ``explain(trace, "all")`` (or of a ``methods="all"`` capture) that were left out -> why."""
        return {str(k): str(v) for k, v in (self.metadata.get(SKIPPED) or {}).items()}

    @property
    def batch_size(self) -> int:
        """The number of batch items explained."""
        return int(self.sources.shape[0])

    @property
    def input_streams(self) -> list[str]:
        """The streams whose tokens the scores are over, in the order of the trace's streams."""
        seen = {name for by_stream in self._scores.values() for name in by_stream}
        return [name for name in self.streams if name in seen]

    def __getitem__(self, method: str) -> Any:
        return self._shaped(method, last=True)

    def __contains__(self, method: object) -> bool:
        return method in self._scores

    def layers(self, method: str) -> Any:
        """``(layers, batch, sources, tokens)`` scores after each computed layer (dict by input stream where
        there are several); [`layer_indices`][attnflow.Explanation.layer_indices] says which layers."""
        return self._shaped(method, last=False)

    def layer_indices(self, method: str) -> tuple[int, ...]:
        """Indices (among the explained stream's layers) of the layers in [`layers`][attnflow.Explanation.layers]."""
        self._require(method)
        return self._layers[method]

    def scores(self, method: str, stream: str | None = None, *, layer: int = -1) -> np.ndarray:
        """``(batch, sources, tokens)`` scores over one input stream (default: the only one, else the
        explained stream), at one computed layer (default the last)."""
        self._require(method)
        by_stream = self._scores[method]
        if stream is None:
            stream = next(iter(by_stream)) if len(by_stream) == 1 else self.stream
        if stream not in by_stream:
            raise OptionError(f"Method {method!r} has scores over the streams {list(by_stream)}, not {stream!r}.")
        return by_stream[stream][layer]

    def tokens(self, stream: str | None = None) -> list[list[str]]:
        """Token labels per batch item of ``stream`` (default the explained stream)."""
        return [list(item) for item in (self.streams[stream or self.stream].tokens or ())]

    def source_tokens(self, batch_index: int = 0) -> list[str]:
        """The labels of the explained tokens of one item."""
        return list(self._source_labels[batch_index])

    def _shaped(self, method: str, *, last: bool) -> Any:
        self._require(method)
        by_stream = {name: (array[-1] if last else array) for name, array in self._scores[method].items()}
        return next(iter(by_stream.values())) if len(by_stream) == 1 else by_stream

    def _require(self, method: str) -> None:
        if method not in self._scores:
            raise OptionError(f"This explanation holds {list(self._scores)}, not {method!r}; explain(trace, [{method!r}, ...]).")

    def _check(self) -> None:
        batch, count = self.sources.shape
        for method, by_stream in self._scores.items():
            for name, array in by_stream.items():
                expected = (len(self._layers[method]), batch, count, self.streams[name].length)
                if array.shape != expected:
                    raise OptionError(
                        f"Scores of {method!r} over {name!r} have shape {array.shape}, expected {expected} "
                        "(layers, batch, sources, tokens)."
                    )

    # -- derived ------------------------------------------------------------------------------------
    def aggregate(self, unit: str = "words", *, word_ids: Sequence[Sequence[int | None]] | None = None) -> Explanation:
        """Scores summed over the sub-word tokens of each word (columns of the explained stream's own tokens
        and of every text input stream).

        Words come from ``word_ids`` (per item, a word index per token or None for special tokens, as a
        Hugging Face tokenizer's ``encoding.word_ids()`` gives) or from the token labels' conventions:
        WordPiece ``##`` continues a word, SentencePiece ``▁`` and byte-level BPE ``Ġ`` start one. Special
        tokens stay words of their own. Rows (the explained tokens) are not merged.
        """
        if unit != "words":
            raise OptionError(f"aggregate() knows the unit 'words', got {unit!r}.")
        groups = {}
        for name, stream in self.streams.items():
            if stream.grid is not None or name not in self.input_streams:
                continue
            ids = word_ids if (word_ids is not None and name == self.stream) else None
            groups[name] = [_word_groups(stream, b, ids[b] if ids is not None else None) for b in range(self.batch_size)]
        scores: dict[str, dict[str, np.ndarray]] = {}
        streams = dict(self.streams)
        for name, per_item in groups.items():  # the explained tokens keep their labels in source_tokens()
            width = max(len(g) for g in per_item)
            tokens, mask = [], np.zeros((self.batch_size, width), bool)
            for b, item in enumerate(per_item):
                labels = self.streams[name].tokens[b]  # type: ignore[index]
                words = [_join([labels[p] for p in group]) for group in item]
                tokens.append(words + ["<pad>"] * (width - len(words)))
                mask[b, : len(words)] = True
            streams[name] = Stream(name, mask=mask, tokens=tokens, causal=self.streams[name].causal,
                                   special=np.zeros_like(mask))
        for method, by_stream in self._scores.items():
            scores[method] = {}
            for name, array in by_stream.items():
                if name not in groups:
                    scores[method][name] = array
                    continue
                width = streams[name].mask.shape[1]  # type: ignore[union-attr]
                merged = np.zeros(array.shape[:-1] + (width,))
                for b, item in enumerate(groups[name]):
                    for w, group in enumerate(item):
                        merged[:, b, :, w] = array[:, b][..., group].sum(axis=-1)
                scores[method][name] = merged
        return Explanation(
            scores=scores, layers=self._layers, stream=self.stream, streams=streams, sources=self.sources,
            requested_sources=self.requested_sources, options=self.options, model_name=self.model_name,
            framework=self.framework, metadata={**thaw_metadata(self.metadata), "aggregated": "words"},
            source_labels=self._source_labels,
        )

    def to_frame(self) -> Any:
        """A long pandas table: one row per method, layer, item, explained token and input token (real
        tokens only), columns ``method, layer, batch, source, source_token, stream, token_index, token, score``;
        ``layer`` is numbered from 1 as in every output ("after layer l of the explained stream's layers"),
        while [`layer_indices`][attnflow.Explanation.layer_indices] stays 0-based, as Python indices are."""
        from .recording._adapter import import_optional

        pandas = import_optional("pandas", "dask")
        rows: dict[str, list[Any]] = {key: [] for key in (
            "method", "layer", "batch", "source", "source_token", "stream", "token_index", "token", "score")}
        for method, by_stream in self._scores.items():
            for name, array in by_stream.items():
                stream = self.streams[name]
                for d, layer in enumerate(self._layers[method]):
                    for b in range(self.batch_size):
                        valid = stream.valid_index(b)
                        for s, position in enumerate(self.sources[b]):
                            source_token = self._source_labels[b][s]
                            for j in valid:
                                rows["method"].append(method)
                                rows["layer"].append(layer + 1)
                                rows["batch"].append(b)
                                rows["source"].append(int(position))
                                rows["source_token"].append(source_token)
                                rows["stream"].append(name)
                                rows["token_index"].append(int(j))
                                rows["token"].append(stream.tokens[b][j])  # type: ignore[index]
                                rows["score"].append(float(array[d, b, s, j]))
        return pandas.DataFrame(rows)

    # -- files --------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the explanation (safetensors arrays + checksummed JSON header; no pickle)."""
        tensors: dict[str, np.ndarray] = {"sources": self.sources}
        streams = []
        for i, stream in enumerate(self.streams.values()):
            tensors[f"streams.{i}.mask"] = stream.mask  # type: ignore[assignment]
            tensors[f"streams.{i}.special"] = stream.special  # type: ignore[assignment]
            streams.append({"name": stream.name, "tokens": [list(t) for t in stream.tokens or ()],
                            "causal": bool(stream.causal), "grid": None if stream.grid is None else list(stream.grid)})
        methods = []
        for m, (method, by_stream) in enumerate(self._scores.items()):
            names = list(by_stream)
            for k, name in enumerate(names):
                tensors[f"scores.{m}.{k}"] = by_stream[name]
            methods.append({"name": method, "streams": names, "layers": list(self._layers[method])})
        header = {
            "stream": self.stream, "streams": streams, "methods": methods,
            "requested_sources": self.requested_sources, "options": self.options.to_dict(),
            "source_labels": [list(row) for row in self._source_labels],
            "model_name": self.model_name, "framework": self.framework, "metadata": thaw_metadata(self.metadata),
        }
        write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION, what="explanation")

    # -- pictures -----------------------------------------------------------------------------------
    def to_html(self, trace: AttentionTrace | None = None, path: str | os.PathLike[str] | None = None, *,
                title: str | None = None, prompt_length: int | None = None) -> str:
        """One self-contained interactive HTML page of this explanation (see [`attnflow.html`][attnflow.html]): the text
        highlighted by the selected method (click a token to explain it), a layer slider, the methods side by
        side, the explained x input map and, given the ``trace`` it was computed from, per-head attention.
        Written to ``path`` too when given. Scores are stored as 16-bit log codes (within 0.05%), per-head
        weights with 8 bits (within 0.2% of each row's largest weight). Returns the page."""
        from .html import to_html, write_html

        if path is not None:
            write_html(self, path, trace, title=title, prompt_length=prompt_length)
            return Path(path).read_text(encoding="utf-8")
        return to_html(self, trace, title=title, prompt_length=prompt_length)

    def _repr_html_(self) -> str:
        """Jupyter shows the interactive page (without per-head weights: use to_html(trace=...) for them)."""
        from .html import notebook_frame

        return notebook_frame(self.to_html())

    def __repr__(self) -> str:
        shape = tuple(self.sources.shape)
        return (f"Explanation(methods={list(self.methods)}, stream={self.stream!r}, batch={shape[0]}, "
                f"sources={shape[1]}, inputs={self.input_streams}, model={self.model_name!r})")


def load_explanation(path: str | os.PathLike[str]) -> Explanation:
    """Read an explanation written by [`Explanation.save`][attnflow.Explanation.save].

    Every header field is checked for its type and range, and every array against the header (streams and
    sources within the explained stream, scores finite and of the shape their method and streams give), as
    the trace loader does: a file that passes builds an Explanation whose writers and pages work.

    Raises:
        TraceFileError: the file is missing, truncated, corrupted, edited, or inconsistent.
    """
    tensors, header = read_tensor_file(path, format=FORMAT, versions=(FORMAT_VERSION,), what="explanation")
    fields = _Fields(header, tensors, f"{str(path)!r} is a damaged attnflow explanation")
    try:
        return _explanation_from(fields)
    except (ValueError, MethodError) as exc:  # TraceError and OptionError too: what the constructors refuse
        raise fields.fail(str(exc).rstrip(".")) from exc


def _explanation_from(f: _Fields) -> Explanation:
    h = f.header
    streams: dict[str, Stream] = {}
    for i, meta in enumerate(f.get(h, "streams", list, "streams", lambda v: 0 < len(v) <= _MAX_ITEMS)):
        name = f.get(meta, "name", str, f"streams[{i}].name", lambda v: bool(v) and v not in streams)
        grid = f.get(meta, "grid", (list, type(None)), f"streams[{i}].grid",
                     lambda v: v is None or (len(v) == 2 and all(_is_count(x) for x in v)))
        mask, special = f.array(f"streams.{i}.mask"), f.array(f"streams.{i}.special")
        if mask.dtype != np.bool_ or special.dtype != np.bool_ or mask.ndim != 2 or special.shape != mask.shape:
            raise f.fail(f"the mask and special-token arrays of stream {name!r} are not (batch, length) booleans")
        tokens = f.labels(f.get(meta, "tokens", list, f"streams[{i}].tokens"), f"streams[{i}].tokens")
        if tokens and (len(tokens) != mask.shape[0] or any(len(item) != mask.shape[1] for item in tokens)):
            raise f.fail(f"stream {name!r} has {mask.shape} mask entries but token labels of other lengths")
        stream = Stream(name=name, mask=mask, special=special, tokens=tokens,
                        causal=f.get(meta, "causal", bool, f"streams[{i}].causal"),
                        grid=None if grid is None else tuple(grid))
        streams[name] = _completed(stream)
    explained = f.get(h, "stream", str, "stream", lambda v: v in streams)
    batch, length = streams[explained].mask.shape  # type: ignore[union-attr]
    sources = f.array("sources")
    if sources.dtype.kind not in "iu" or sources.ndim != 2 or sources.shape[0] != batch or not (
            sources.size == 0 or (sources.min() >= 0 and sources.max() < length)):
        raise f.fail(f"array 'sources' must hold ({batch}, S) positions of the {length} tokens of stream {explained!r}")
    count = sources.shape[1]
    scores: dict[str, dict[str, np.ndarray]] = {}
    layers: dict[str, list[int]] = {}
    for m, meta in enumerate(f.get(h, "methods", list, "methods", lambda v: 0 < len(v) <= _MAX_METHODS)):
        name = f.get(meta, "name", str, f"methods[{m}].name", lambda v: v.isidentifier() and v not in scores)
        inputs = f.get(meta, "streams", list, f"methods[{m}].streams",
                       lambda v: all(isinstance(x, str) and x in streams for x in v) and 0 < len(v) == len(set(v)))
        depths = f.get(meta, "layers", list, f"methods[{m}].layers", lambda v: 0 < len(v) and all(
            _is_index(x) for x in v) and all(a < b for a, b in zip(v, v[1:])))
        scores[name], layers[name] = {}, depths
        for k, stream_name in enumerate(inputs):
            array = f.array(f"scores.{m}.{k}")
            expected = (len(depths), batch, count, streams[stream_name].length)
            if array.dtype.kind != "f" or array.shape != expected or not np.isfinite(array).all():
                raise f.fail(f"scores of {name!r} over {stream_name!r} must be finite floats of shape {expected}")
            scores[name][stream_name] = array
    requested = f.get(h, "requested_sources", (list, type(None)), "requested_sources",
                      lambda v: v is None or (len(v) == count and all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in v)))
    labels = f.labels(f.get(h, "source_labels", list, "source_labels"), "source_labels")
    if len(labels) != batch or any(len(row) != count for row in labels):
        raise f.fail(f"header field source_labels must hold {batch} rows of {count} labels")
    options = f.get(h, "options", dict, "options")
    try:
        parsed = Options.from_dict(options)
    except (TypeError, ValueError, KeyError) as exc:
        raise f.fail(f"header field options cannot be read ({type(exc).__name__}: {exc})") from exc
    metadata = f.get(h, "metadata", dict, "metadata")
    skipped = metadata.get(SKIPPED, {})
    if not isinstance(skipped, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in skipped.items()):
        raise f.fail(f"metadata[{SKIPPED!r}] must map method names to reasons")
    f.finish()
    return Explanation(
        scores=scores, layers=layers, stream=explained, streams=streams, sources=sources, requested_sources=requested,
        options=parsed, model_name=f.get(h, "model_name", str, "model_name"),
        framework=f.get(h, "framework", str, "framework"), metadata=metadata, source_labels=labels,
    )


#: Bounds a loaded explanation's header must keep (far above any real one; they stop absurd files early).
_MAX_ITEMS, _MAX_METHODS, _MAX_LAYER = 64, 1024, 1 << 16


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < (1 << 31)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_LAYER


def _completed(stream: Stream) -> Stream:
    from .trace._stream import complete_stream

    mask = np.asarray(stream.mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"the mask of stream {stream.name!r} is not a (batch, length) bool array")
    return complete_stream(stream, mask.shape[0], mask.shape[1], bool(stream.causal))


def _read_only(array: Any) -> np.ndarray:
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out


_CONTINUES = "##"
_STARTS = ("▁", "Ġ")


def _word_groups(stream: Stream, b: int, word_ids: Sequence[int | None] | None) -> list[list[int]]:
    """Positions of each word of one item, in order (padding left out)."""
    valid = stream.valid_index(b).tolist()
    labels = stream.tokens[b]  # type: ignore[index]
    special = stream.special[b]  # type: ignore[index]
    groups: list[list[int]] = []
    if word_ids is not None:
        if len(word_ids) != stream.length:
            raise OptionError(f"word_ids[{b}] has {len(word_ids)} entries; the stream has {stream.length} tokens.")
        last = object()
        for p in valid:
            w = word_ids[p]
            if w is None or w != last or not groups:
                groups.append([p])
            else:
                groups[-1].append(p)
            last = w if w is not None else object()
        return groups
    real = [labels[p] for p in valid]
    starts_marked = any(t.startswith(_STARTS) for t in real)
    for p in valid:
        label = labels[p]
        new = (
            not groups or special[p] or special[groups[-1][-1]]
            or (label.startswith(_STARTS) if starts_marked else not label.startswith(_CONTINUES))
        )
        if new:
            groups.append([p])
        else:
            groups[-1].append(p)
    return groups


def _join(pieces: list[str]) -> str:
    text = "".join(piece[len(_CONTINUES):] if i and piece.startswith(_CONTINUES) else piece for i, piece in enumerate(pieces))
    for mark in _STARTS:
        text = text.replace(mark, "")
    return text or pieces[0]

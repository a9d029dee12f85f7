"""The flags every subcommand shares, defined once: the same names, syntax, defaults and help everywhere.

The method options (``--head-fusion``, ``--residual``, ``--discard-ratio``, ``--layers``, ``--normalize``,
``--flow-solver``, ``--n-jobs``, ``--max-seconds``) are generated from the fields of [`attnflow.Options`][attnflow.Options]
(their help is the field's ``metadata["help"]``); ``--methods``, ``--sources``, ``--target`` and the model
flags are written here once. Device and dtype placement goes through the adapter (``Adapter.place``), so
this module, like every subcommand module, imports no framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from collections.abc import Sequence
from typing import Any

from .._errors import OptionError
from ..methods._fusion import check_max_seconds
from ..methods._options import Options
from ..methods._registry import list_methods

#: ``--methods``' default in every subcommand.
DEFAULT_METHODS = "raw,rollout,flow"
#: The `Options` fields that have a flag (``heads`` and ``weights`` are Python-only for now).
OPTION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Options) if f.metadata.get("cli", True))
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")
_NUMBER = re.compile(r"-?\d+")


def flag(name: str) -> str:
    """``head_fusion`` -> ``--head-fusion``."""
    return "--" + name.replace("_", "-")


def _choices(field: dataclasses.Field[Any]) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` field (``X | None`` included), else None."""
    hint = typing.get_type_hints(Options)[field.name]
    for part in (hint, *typing.get_args(hint)):
        if typing.get_origin(part) is typing.Literal:
            return typing.get_args(part)
    return None


def add_option_flags(parser: argparse.ArgumentParser, names: Sequence[str] = OPTION_FIELDS) -> None:
    """One flag per [`Options`][attnflow.Options] field in ``names``, generated from the field: its default, its choices
    (``Literal`` fields), its type (from the default) and its help (``metadata["help"]``)."""
    group = parser.add_argument_group("method options (attnflow.Options)")
    for field in dataclasses.fields(Options):
        if field.name not in names:
            continue
        if not field.metadata.get("cli", True):
            raise ValueError(f"Options.{field.name} has no command-line flag.")
        default = field.default
        keywords: dict[str, Any] = {"dest": field.name, "default": default, "help": field.metadata["help"]}
        if "metavar" in field.metadata:
            keywords["metavar"] = field.metadata["metavar"]
        choices = _choices(field)
        if isinstance(default, bool):
            keywords["action"] = argparse.BooleanOptionalAction
        elif choices is not None:
            keywords["choices"] = choices
        elif isinstance(default, (int, float)):
            keywords["type"] = type(default)
        group.add_argument(flag(field.name), **keywords)


def options_from(args: argparse.Namespace, names: Sequence[str] = OPTION_FIELDS) -> Options:
    """The [`Options`][attnflow.Options] of the flags in ``names`` (checked; ``--layers`` read as 1-based layer numbers)."""
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if "layers" in values:
        values["layers"] = parse_layers(values["layers"])
    if "max_seconds" in values:
        values["max_seconds"] = check_max_seconds(values["max_seconds"])
    return Options(**values)


def parse_layers(text: str | None) -> Any:
    """``--layers`` (1-based layer numbers, as every output numbers layers) as `Options.layers` (0-based
    indices): None; ``A..B`` (inclusive, either end optional, negatives from the end) as a ``(start, end)``
    pair; ``L1,L2,...`` as a list of indices."""
    if text is None:
        return None
    text = text.strip()
    if ":" in text:
        raise OptionError(
            f"--layers takes layer numbers from 1 (as every output numbers layers): A..B (inclusive) or L1,L2; got "
            f"{text!r}. The former START:END (0-based, end exclusive) reads A+1..END: e.g. 2:6 is now 3..6."
        )
    range_ = re.fullmatch(r"\s*(-?\d+)?\s*\.\.\s*(-?\d+)?\s*", text)
    if range_ and (range_.group(1) or range_.group(2)):
        start, end = (None if part is None else _layer_number(int(part), text) for part in range_.groups())
        start_index = None if start is None else (start - 1 if start > 0 else start)
        end_index = None if end is None or end == -1 else (end if end > 0 else end + 1)
        return (start_index, end_index)
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(_NUMBER.fullmatch(part) for part in parts):
        raise OptionError(
            f"--layers must be A..B (layer numbers from 1, inclusive; e.g. 3..6, ..4, -2.. for the last two) or "
            f"comma-separated layer numbers (e.g. 1,4,6); got {text!r}."
        )
    return [n - 1 if n > 0 else n for n in (_layer_number(int(part), text) for part in parts)]


def _layer_number(number: int, text: str) -> int:
    if number == 0:
        raise OptionError(
            f"--layers numbers layers from 1 (layer 1 = after the first layer; -1 = the last), got 0 in {text!r}."
        )
    return number


def describe_layers(text: str | None) -> str:
    """``--layers`` as given, for messages."""
    return "all layers" if text is None else f"--layers {text}"


def add_methods_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, metavar="M1,M2|all",
        help=f"comma-separated registered methods, any of {', '.join(list_methods())}; or all: every method the "
        "adapter can capture for the model (compare: every method both traces hold); those that cannot be "
        f"computed are listed as skipped, with the reason (default {DEFAULT_METHODS}). What the methods need "
        "(attention gradients, value vectors, value zeroing) is captured for them",
    )


def add_sources_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sources", nargs="+", default=None, metavar="TOKEN",
        help="the explained tokens: positions (negative counts back from the last real token) and/or token texts, "
        "comma- or space-separated (--sources 0,cabinet,-1 or --sources 0 cabinet -1), or all. Default: every "
        "token in explain (pictures and the table show the first source), 0 in batch, 0 in "
        "compare (-1 for causal traces). batch takes positions only (the same text may sit elsewhere per line)",
    )


def parse_sources(items: Sequence[str] | None) -> list[int | str] | None:
    """``--sources`` items: ints are positions, anything else token text; None (or ``all``): every token."""
    if items is None or [item.strip().lower() for item in items] == ["all"]:
        return None
    out: list[int | str] = []
    for item in items:
        parts = [item] if item.strip() == "," else [part for part in item.split(",") if part.strip()]
        for part in parts:
            part = part.strip() if part.strip() else part
            out.append(int(part) if _NUMBER.fullmatch(part) else part)
    if not out:
        raise OptionError(f"--sources names no token: {list(items)}.")
    if len(set(map(str, out))) != len(out):
        raise OptionError(f"--sources names a token twice: {list(items)}.")
    return out


def resolve_sources(trace: Any, items: list[int | str] | None, stream: str | None = None) -> list[int] | None:
    """``--sources`` as positions of the explained stream, the same in every item; token texts are looked up."""
    if items is None:
        return None
    stream_ = trace.streams[stream or trace.default_stream()]
    out = []
    for item in items:
        if isinstance(item, int):
            lengths = stream_.lengths()
            if not -int(lengths.min()) <= item < int(lengths.min()):
                raise OptionError(
                    f"--sources {item} is outside the {int(lengths.min())} real tokens of the shortest input; tokens "
                    f"are {list(stream_.tokens[0][p] for p in stream_.valid_index(0))}."
                )
            out.append(item)
            continue
        found = []
        for b in range(trace.batch_size):
            hits = [int(p) for p in stream_.valid_index(b) if stream_.tokens[b][p] == item]
            if not hits:
                raise OptionError(
                    f"--sources {item!r}: no token of input {b} reads so; its tokens are "
                    f"{[stream_.tokens[b][p] for p in stream_.valid_index(b)]}. Give the token text exactly, or its "
                    "position."
                )
            found.append(hits[0])
        if len(set(found)) != 1:
            raise OptionError(f"--sources {item!r} sits at different positions in the inputs ({found}); give positions.")
        out.append(found[0])
    if len(set(out)) != len(out):
        raise OptionError(f"--sources names the same token twice ({items} -> positions {out}).")
    return out


def add_target_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="auto", metavar="auto|embedding|INDEX",
        help="the score being explained (by the gradient methods grad_rollout and attn_grad, and by evaluate's "
        "references): auto (a line's \"label\" logit where evaluate's input gives one; else the argmax logit of a "
        "classifier; for a decoder the next-token logit at each item's last real token; for a model without "
        "logits, such as the packaged sentence encoder, the embedding target: the mean-pooled last hidden state "
        "projected on its own direction), embedding, or a logit index (a class or vocabulary id). Not the "
        "decoder's text: that is --target-text (explain) or the input lines' \"target\" field (batch)",
    )


def parse_target(value: str) -> int | str | None:
    """``--target``: None (auto), ``"embedding"`` or a logit index (>= 0)."""
    if value == "auto":
        return None
    if value == "embedding":
        return value
    if re.fullmatch(r"\d+", value):
        return int(value)
    raise OptionError(f"--target must be auto, embedding or a logit index (a class or vocabulary id, >= 0); got {value!r}.")


def add_model_flags(parser: argparse.ArgumentParser, *, out: str) -> None:
    """``--model``, ``--adapter``, ``--trust-remote-code``, ``--max-length`` and ``--out`` (default ``out``)."""
    parser.add_argument(
        "--model", default=None,
        help="local Hugging Face model directory (as the workers see it, for batch), or a hub id on machines with "
        "network (default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--adapter", default="transformers", help="adapter that loads the model (default: transformers)")
    parser.add_argument("--out", default=out, help=f"output directory (default: {out}/)")
    parser.add_argument(
        "--max-length", type=int, default=None, metavar="N",
        help="keep only the first N tokens of a text longer than that (default: a text longer than the model takes "
        "is refused)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow a model directory that ships its own Python code (auto_map in config.json): this RUNS that "
        "code with your permissions (in batch, on every worker); only for directories you trust",
    )


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="show no progress")


def warn_deprecated(old: str, new: str) -> None:
    print(f"attnflow: {old} is deprecated; use {new}.", file=sys.stderr)


# -- device and dtype placement, through the adapter ------------------------------------------------------
def add_placement_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="run the model on this device (the adapter's names; torch: cpu, cuda, cuda:1, mps)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="run the model in this dtype (default: as loaded)")


def _placer(adapter: Any) -> Any:
    place = getattr(adapter, "place", None)
    if not callable(place):
        raise OptionError(
            f"--device/--dtype: adapter {getattr(adapter, 'name', adapter)!r} cannot place models on devices (it has "
            "no place(model, inputs, device=, dtype=) method); leave --device and --dtype out, or use an adapter that "
            "can (transformers)."
        )
    return place


def check_device(adapter: Any, device: str | None) -> None:
    """A device name in the usual form, present on this machine (asked of the adapter before the model loads)."""
    if device is None:
        return
    if not _DEVICE.match(device):
        raise OptionError(f"--device must be cpu, cuda, cuda:N, mps or xpu:N; got {device!r}.")
    _placer(adapter)(None, None, device=device, dtype=None)


def place(adapter: Any, model: Any, inputs: Any, *, device: str | None, dtype: str | None) -> tuple[Any, Any]:
    """``(model, inputs)`` placed on ``device`` in ``dtype`` by ``adapter.place`` (unchanged when both are None);
    either of ``model`` and ``inputs`` may be None (placed later)."""
    if device is None and dtype is None:
        return model, inputs
    placed = _placer(adapter)(model, inputs, device=device, dtype=dtype)
    return placed[0], placed[1]


def check_layers(trace: Any, text: str | None, stream: str | None = None) -> None:
    """``--layers`` against the explained stream's layer count (after the capture), in layer numbers from 1."""
    if text is None:
        return
    from ..methods._fusion import select_layers, stream_layer_indices

    count = len(stream_layer_indices(trace, stream or trace.default_stream()))
    layers = parse_layers(text)
    numbers: list[int] = []
    if isinstance(layers, tuple):
        start, end = layers
        numbers = [n for n in ((None if start is None else (start + 1 if start >= 0 else start)),
                               (None if end is None else (end if end > 0 else end - 1))) if n is not None]
    else:
        numbers = [i + 1 if i >= 0 else i for i in layers]
    past = [n for n in numbers if not (1 <= n <= count or -count <= n <= -1)]
    if past:
        raise OptionError(
            f"--layers {text}: layer {past[0]} is past the last layer: the explained stream has {count} layers, "
            f"numbered 1..{count} (or -1..-{count} from the end)."
        )
    try:
        select_layers(trace, layers, stream)
    except OptionError as exc:
        raise OptionError(f"--layers {text} selects no usable layers of the {count} (numbered 1..{count}): {exc}") from exc


def add_batch_size_flag(parser: argparse.ArgumentParser) -> None:
    from ..batch._driver import DEFAULT_BATCH_SIZE

    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
        help=f"texts per forward pass (in batch, also per Dask task) (default {DEFAULT_BATCH_SIZE})",
    )

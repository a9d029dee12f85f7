"""One command-line vocabulary: the subcommands share their flags' names, syntax, defaults and help; the
Options flags are generated from attnflow.Options; the core CLI imports no framework."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

import attnflow
from attnflow import OptionError
from attnflow.cli import build_parser
from attnflow.cli._common import (
    DEFAULT_METHODS,
    OPTION_FIELDS,
    check_device,
    parse_layers,
    parse_sources,
    parse_target,
    place,
)

#: Flags whose default differs by subcommand on purpose (their help says each one's default).
DIFFERENT_ON_PURPOSE = {
    "--out": "each command writes to its own default folder (attnflow-out/, results/)",
    "--html": "explain writes its page into --out unless given a PATH; compare has no output folder",
}


def subcommands() -> dict[str, dict[str, argparse.Action]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {option: action for action in command._actions for option in action.option_strings}
        for name, command in sub.choices.items()
    }


def described(action: argparse.Action) -> tuple:
    return (action.dest, action.type, action.default, action.choices and tuple(action.choices), action.nargs,
            action.help, type(action).__name__, action.metavar)


def test_the_same_flag_means_the_same_in_every_subcommand():
    commands = subcommands()
    flags = {option for actions in commands.values() for option in actions if option not in ("-h", "--help")}
    shared = 0
    for option in sorted(flags):
        having = {name: actions[option] for name, actions in commands.items() if option in actions}
        if len(having) < 2 or option in DIFFERENT_ON_PURPOSE:
            continue
        shared += 1
        first, *others = having.items()
        for name, action in others:
            assert described(action) == described(first[1]), (option, first[0], name)
    assert shared >= 12  # --model, --adapter, --methods, --sources, --target, the Options flags...


def test_options_flags_are_generated_from_the_options_fields():
    commands = subcommands()
    fields = {f.name: f for f in dataclasses.fields(attnflow.Options)}
    for name in OPTION_FIELDS:
        option = "--" + name.replace("_", "-")
        assert fields[name].metadata["help"], name
        for command in ("explain", "batch"):
            action = commands[command][option]
            assert action.dest == name and action.help == fields[name].metadata["help"], (command, name)
            assert action.default == fields[name].default, (command, name)
    assert "--layers" not in commands["evaluate"]  # evaluate tables every layer
    for command in ("explain", "batch", "evaluate", "compare"):
        assert commands[command]["--head-fusion"].default is None  # as captured, else mean
        assert commands[command]["--methods"].default == DEFAULT_METHODS == "raw,rollout,flow"
    for command in ("explain", "batch", "evaluate"):
        assert commands[command]["--max-seconds"].default == attnflow.Options().max_seconds
        assert commands[command]["--target"].default == "auto"
    for command in ("explain", "batch", "compare"):
        assert commands[command]["--sources"].nargs == "+"
    assert "--layer" in commands["explain"] and commands["explain"]["--layer"].help == argparse.SUPPRESS


def test_layers_are_numbered_from_one_on_the_command_line():
    assert parse_layers(None) is None
    assert parse_layers("3..6") == (2, 6) and parse_layers("..4") == (None, 4) and parse_layers("5..") == (4, None)
    assert parse_layers("-2..") == (-2, None) and parse_layers("..-2") == (None, -1) and parse_layers("-3..-1") == (-3, None)
    assert parse_layers("1,4,6") == [0, 3, 5] and parse_layers("-1") == [-1] and parse_layers("2") == [1]
    for bad, message in (("2:6", "2:6 is now 3..6"), ("0", "from 1"), ("a..b", "must be A..B"), ("..", "must be A..B")):
        with pytest.raises(OptionError, match=message.replace(".", r"\.")):
            parse_layers(bad)


def test_sources_one_syntax():
    assert parse_sources(None) is None and parse_sources(["all"]) is None
    assert parse_sources(["0", "cabinet", "-1"]) == parse_sources(["0,cabinet,-1"]) == [0, "cabinet", -1]
    assert parse_sources([","]) == [","]
    with pytest.raises(OptionError, match="twice"):
        parse_sources(["0,0"])


def test_target_one_syntax():
    assert parse_target("auto") is None and parse_target("embedding") == "embedding" and parse_target("3") == 3
    with pytest.raises(OptionError, match="auto, embedding or a logit index"):
        parse_target("-1")


def test_batch_sources_and_target():
    from attnflow.cli._batch import sources_from, target_from

    assert sources_from(None) == (0,) and sources_from(["all"]) == "all" and sources_from(["0,-1"]) == [0, -1]
    with pytest.raises(OptionError, match="takes token positions"):
        sources_from(["cabinet"])
    assert target_from("auto") is None and target_from("4") == 4 and target_from("embedding") == "embedding"


def test_placement_goes_through_the_adapter():
    class NoPlace:
        name = "noplace"

    assert place(NoPlace(), "model", {"x": 1}, device=None, dtype=None) == ("model", {"x": 1})
    with pytest.raises(OptionError, match="cannot place models"):
        place(NoPlace(), "model", None, device="cpu", dtype=None)
    with pytest.raises(OptionError, match="--device must be"):
        check_device(NoPlace(), "tpu")
    calls = []

    class Placing:
        name = "placing"

        def place(self, model, inputs, *, device=None, dtype=None):
            calls.append((model, inputs, device, dtype))
            return model, inputs

    check_device(Placing(), "cuda:1")
    place(Placing(), None, {"ids": 1}, device="cpu", dtype="float64")
    assert calls == [(None, None, "cuda:1", None), (None, {"ids": 1}, "cpu", "float64")]


def test_transformers_adapter_places_model_and_inputs():
    import torch

    from attnflow.recording._registry import get_adapter

    adapter = get_adapter("transformers")
    model = torch.nn.Linear(2, 2)
    moved, inputs = adapter.place(model, {"input_ids": torch.ones(1, 2, dtype=torch.long),
                                          "pixel_values": torch.ones(1, 2)}, device="cpu", dtype="float64")
    assert moved.weight.dtype == torch.float64
    assert inputs["input_ids"].dtype == torch.long and inputs["pixel_values"].dtype == torch.float64
    with pytest.raises(OptionError, match="no such device"):
        adapter.place(None, None, device="cuda:99")


def test_the_command_line_imports_no_framework():
    code = (
        "import sys\n"
        "import attnflow.cli, attnflow.cli._common, attnflow.cli._explain, attnflow.cli._generate, "
        "attnflow.cli._batch, attnflow.cli._compare, attnflow.cli._evaluate\n"
        "attnflow.cli.build_parser()\n"
        "bad = [m for m in ('torch', 'jax', 'flax', 'transformers', 'tensorflow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr

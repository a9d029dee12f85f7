"""One numbering for layers in every output (docs/format.md, "Layer numbers"): layer l of L, from 1, counting
the explained stream's layers; the same layer is called the same in the pictures, the page, the printed
tables, explanation.json, evaluate's and compare's outputs, and the command line's --layers."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest

import attnflow
from attnflow import plot
from attnflow.cli import main

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
LAST_CROSS = "model.decoder.layers.1.encoder_attn"


def _save_tokenizer(directory):
    from transformers import BertTokenizer

    BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(directory)


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    """A tiny BART: 2 encoder layers, 2 decoder blocks (the decoder stream's 4 layers: self, cross, self, cross)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(VOCAB) + 1, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    directory = tmp_path_factory.mktemp("numbering") / "tiny-bart"
    BartForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    _save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB) + 1, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=32)
    directory = tmp_path_factory.mktemp("numbering") / "tiny-bert"
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    _save_tokenizer(directory)
    return directory


def heading(figure) -> str:
    """The figure's titles, wrapped lines joined."""
    text = " ".join(t.get_text() for t in figure.texts) + " " + " ".join(a.get_title() for a in figure.axes)
    return " ".join(text.split())


def test_the_last_cross_attention_layer_is_layer_4_of_4_everywhere(bart_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", "a b c", "--target-text", "x y", "--model", str(bart_dir), "--out", str(out),
                 "--html"]) == 0
    printed = capsys.readouterr().out
    # the printed tables
    assert "Top encoder tokens per decoder token (rollout, after layer 4 of 4 of the decoder)" in printed
    # explanation.json: layer numbers from 1 and the stream's modules in that order
    document = json.loads((out / "explanation.json").read_text())
    assert document["layers"]["rollout"] == [1, 2, 3, 4] and document["layers"]["flow"] == [4]
    assert document["stream_layers"][4 - 1] == LAST_CROSS and len(document["stream_layers"]) == 4
    assert "from 1" in document["layer_numbering"]
    trace = attnflow.load(out / "trace.safetensors")
    last = [layer.name for layer in trace.layers].index(LAST_CROSS)
    explanation = attnflow.explain(trace, ["raw", "rollout", "flow"])
    # the pictures: heatmap titles, the head grid, the flow graph's columns
    assert "after layer 4 of 4 of the decoder" in heading(plot.heatmap(explanation, "rollout", stream="encoder"))
    grid = plot.head_grid(trace, last)
    assert f"layer 4 of 4 of the decoder ({LAST_CROSS})" in heading(grid)
    assert {a.get_title().split(" H")[0] for a in grid.axes if a.get_title()} == {"decoder L4"}
    graph = plot.flow_graph(trace, source=-1, stream="decoder")
    columns = [t.get_text() for t in graph.axes[0].get_xticklabels()]
    assert "decoder\nL4" in columns and "encoder\nL2" in columns and "decoder\nL5" not in columns
    # the page: the layer list numbers each layer within its query stream, with its module
    from html_page import page_data

    data, _ = page_data((out / "explanation.html").read_text(encoding="utf-8"))
    entry = next(layer for layer in data["layers"] if layer["name"] == LAST_CROSS)
    assert (entry["number"], entry["count"], entry["query"]) == (4, 4, "decoder")
    assert max(max(m["layers"]) for m in data["methods"]) + 1 == 4  # the slider's last position shows "4 of 4"
    # the command line takes the same numbers: --layers ..4 is every decoder layer, ..5 is past the last
    assert main(["explain", "a b c", "--target-text", "x y", "--model", str(bart_dir), "--out", str(tmp_path / "o2"),
                 "--layers", "..5", "--methods", "rollout"]) == 1
    assert "layer 5 is past the last layer: the explained stream has 4 layers" in capsys.readouterr().err
    # compare: the same layer is "decoder layer 4" in its table, verdict and JSON
    import dataclasses

    import numpy as np

    bent = [dataclasses.replace(layer, weights=np.roll(layer.weights, 1, axis=-1)) if layer.name == LAST_CROSS
            else layer for layer in trace.layers]
    report = attnflow.compare(trace, trace.replace(layers=bent, metadata={}), flow=False)
    assert "decoder layer 4 head" in report.to_table() and "decoder layer 6" not in report.to_table()
    row = next(layer for layer in report.to_dict()["layers"] if layer["name_a"] == LAST_CROSS)
    assert (row["layer"], row["stream"], row["label"]) == (4, "decoder", "decoder 4")


def test_one_numbering_on_an_encoder_explain_evaluate_and_compare(bert_dir, tmp_path, capsys):
    out = tmp_path / "explain"
    assert main(["explain", "a b c d", "--model", str(bert_dir), "--out", str(out), "--layers", "2..3"]) == 0
    capsys.readouterr()
    document = json.loads((out / "explanation.json").read_text())
    assert document["layers"]["rollout"] == [2, 3] and document["layers"]["flow"] == [3]
    assert document["options"]["layers"] == {"pair": [1, 3]}  # Python's Options: 0-based indices
    assert document["stream_layers"][3 - 1].startswith("encoder.layer.2")

    assert main(["explain", "a b c d", "--model", str(bert_dir), "--out", str(out)]) == 0
    assert "Top input tokens for '[CLS]' (position 0), after layer 3 of 3:" in capsys.readouterr().out
    trace = attnflow.load(out / "trace.safetensors")
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    assert "after layer 3 of 3" in heading(plot.heatmap(explanation, "rollout"))
    assert "layer 3 of 3 (encoder.layer.2" in heading(plot.head_grid(trace, 2))
    assert "L3" in [t.get_text() for t in plot.flow_graph(trace, source=0).axes[0].get_xticklabels()]

    # evaluate: the per-layer table, the leaderboard and the printed table say layer 3 for the last layer
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a b c d"}\n{"text": "d c b"}\n')
    results = tmp_path / "results"
    assert main(["evaluate", str(texts), "--model", str(bert_dir), "--out", str(results), "--methods", "raw,rollout",
                 "--references", "blankout", "--no-curves", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "L1 = after the first layer" in printed and "L3" in printed and "L4" not in printed
    with open(results / "faithfulness.csv") as handle:
        assert {int(row["layer"]) for row in csv.DictReader(handle)} == {1, 2, 3}
    with open(results / "leaderboard.csv") as handle:
        assert {int(row["layer"]) for row in csv.DictReader(handle)} == {3}

    # compare: one row per layer, numbered from 1, the failing head named by that number
    swapped = dataclasses.replace(trace.layers[2], weights=np.ascontiguousarray(trace.layers[2].weights[:, ::-1]))
    other = trace.replace(layers=[*trace.layers[:2], swapped])  # the last layer's two heads swapped
    other.save(tmp_path / "b.safetensors")
    assert main(["compare", str(out / "trace.safetensors"), str(tmp_path / "b.safetensors"), "--no-flow"]) == 1
    table = capsys.readouterr().out
    assert "layer 3 head 0" in table and "layer 2 head" not in table
    rows = [re.match(r"\s*(\d+)\s+\S*encoder\.layer\.(\d+)\.", line) for line in table.splitlines()]
    rows = [(int(m.group(1)), int(m.group(2))) for m in rows if m]
    assert rows == [(1, 0), (2, 1), (3, 2)]  # number = module index + 1


def test_batch_table_numbers_layers_from_one(bert_dir, tmp_path):
    from attnflow.batch import run_batch

    texts = tmp_path / "in.jsonl"
    texts.write_text('{"id": "a", "text": "a b c d"}\n')
    run_batch(texts, tmp_path / "out", model=bert_dir, methods="rollout", all_layers=True, workers=1,
              processes=False, progress=False)
    import pyarrow.parquet as pq

    layers = set(pq.read_table(tmp_path / "out" / "scores.parquet").column("layer").to_pylist())
    assert layers == {1, 2, 3}

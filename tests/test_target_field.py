"""--target-field (issue 23): the JSONL field holding an encoder-decoder's decoder text is named by the user,
apart from --target (the score gradient methods explain)."""

from __future__ import annotations

import json

import pytest

import attnflow
from attnflow.batch._inputs import read_inputs
from attnflow.cli import main


def test_the_decoder_text_is_read_from_the_named_field(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"id": "a", "text": "x y", "summary": "s t", "target": "ignored"}, {"id": "b", "text": "z", "summary": 3},
            {"id": "c", "text": "w"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    examples, malformed = read_inputs(path, target_field="summary")
    assert [(e.id, e.target) for e in examples] == [("a", "s t"), ("c", None)]
    assert len(malformed) == 1 and malformed[0].line == 2 and '"summary"' in malformed[0].reason
    default, _ = read_inputs(path)
    assert [e.target for e in default] == ["ignored", None, None]


def test_a_field_that_is_not_a_decoder_text_is_refused(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "a b"}) + "\n")
    with pytest.raises(attnflow.OptionError, match="target_field"):
        attnflow.run_batch(path, tmp_path / "out", target_field="text")
    assert main(["batch", str(path), "--out", str(tmp_path / "o2"), "--target-field", "id", "--no-progress"]) == 1
    assert "target_field must name the JSONL field" in capsys.readouterr().err


def test_batch_takes_the_embedding_target():
    """batch --target embedding: gradient methods explain the pooled output's own direction (as explain does)."""
    from attnflow.batch._settings import make_settings

    settings = make_settings(adapter="transformers", model=None, methods="grad_rollout", sources=None,
                             all_layers=False, options=None, max_length=None, local=True, target="embedding")
    assert settings.target == "embedding" and settings.capture_options()["target"] == "embedding"
    with pytest.raises(attnflow.OptionError, match="'embedding' or 'argmax'"):
        make_settings(adapter="transformers", model=None, methods="grad_rollout", sources=None, all_layers=False,
                      options=None, max_length=None, local=True, target="pooled")

"""``attnflow evaluate`` on the packaged MiniLM: options refused before the model loads, every method through
capture(methods=), the leaderboard files, resume rules (id + text hash + settings; a larger --methods set
adds methods), the output lock, and a failed run that leaves nothing behind."""

from __future__ import annotations

import json

import pandas
import pytest

from attnflow.batch._store import holding
from attnflow.cli import _evaluate, main
from attnflow.evaluate import LEADERBOARD_COLUMNS

TEXTS = ['{"text": "The keys are here.", "id": "keys"}', '{"text": "A dog barks loudly."}']


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded: these options must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(_evaluate, "load_model", refuse)


@pytest.mark.parametrize("options, message", [
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--methods", "alti,nonsense"], "nonsense"),
    (["--references", "blankout,gradnorm"], "--references must name"),
    (["--references", "blankout,blankout"], "once each"),
    (["--adapter", "torch", "--methods", "alti,value_zeroing"], "'values'"),
    (["--batch-size", "0"], "--batch-size"),
    (["--blank", "nothing"], "--blank"),
    (["--target", "best"], "--target"),
])
def test_bad_options_are_refused_before_the_model_loads(tmp_path, texts, no_model, capsys, options, message):
    out = tmp_path / "out"
    assert main(["evaluate", str(texts), "--out", str(out), *options]) == 1
    error = capsys.readouterr().err
    assert message in error, error
    assert not out.exists()  # nothing written that could block the next run


def test_the_refusal_of_methods_names_every_missing_need(tmp_path, texts, no_model, capsys):
    assert main(["evaluate", str(texts), "--out", str(tmp_path / "o"), "--adapter", "torch",
                 "--methods", "alti,grad_rollout,value_zeroing"]) == 1
    error = capsys.readouterr().err
    assert "'values'" in error and "'attn_grad'" in error and "'value_zeroing'" in error and "transformers" in error


@pytest.mark.slow
def test_explicit_methods_leaderboard_resume_and_refusals(tmp_path, texts, capsys):
    out = tmp_path / "out"
    base = [str(texts), "--out", str(out), "--references", "blankout", "--no-progress", "--seed", "3"]
    assert main(["evaluate", *base, "--methods", "alti,norm,grad_rollout,value_zeroing"]) == 0
    captured = capsys.readouterr()
    assert "value_zeroing costs about one forward pass per token per layer" in captured.err
    assert "Most faithful to blankout on this data:" in captured.out
    assert "special tokens ([CLS], [SEP]...): excluded" in captured.out
    assert "higher ρ and comprehensiveness are better, lower sufficiency is better" in captured.out
    board = pandas.read_csv(out / "leaderboard.csv")
    assert list(board.columns) == list(LEADERBOARD_COLUMNS)
    assert set(board.method) == {"alti", "norm", "grad_rollout", "value_zeroing", "random"}
    assert (board.layer == 6).all() and (board.n == 2).all() and list(board["rank"]) == [1, 2, 3, 4, 5]
    assert (board.rho_last.diff().dropna() <= 0).all()  # ranked by the last-layer mean
    assert ((board.rho_last_low <= board.rho_last) & (board.rho_last <= board.rho_last_high)).all()
    assert len(pandas.read_parquet(out / "leaderboard.parquet")) == 5
    assert (out / "leaderboard.png").stat().st_size > 1000
    assert sorted(set(pandas.read_csv(out / "faithfulness.csv").layer)) == [1, 2, 3, 4, 5, 6]  # 1-based
    keys = json.loads((out / "examples" / "keys.json").read_text())
    assert keys["methods"] == ["alti", "norm", "grad_rollout", "value_zeroing"] and len(keys["text_sha256"]) == 64
    alti_before = keys["report"]["correlations"]["alti"]

    # a larger --methods set: only the new method is computed, merged into the stored results
    assert main(["evaluate", *base, "--methods", "alti,norm,grad_rollout,value_zeroing,raw"]) == 0
    captured = capsys.readouterr()
    assert "2 given new methods" in captured.out and "value_zeroing costs" not in captured.err
    keys = json.loads((out / "examples" / "keys.json").read_text())
    assert keys["methods"] == ["alti", "norm", "grad_rollout", "value_zeroing", "raw"]
    assert keys["report"]["correlations"]["alti"] == alti_before
    assert set(pandas.read_csv(out / "leaderboard.csv").method) == {"alti", "norm", "grad_rollout", "value_zeroing",
                                                                    "raw", "random"}
    assert json.loads((out / "settings.json").read_text())["methods"][-1] == "raw"

    # any other difference is refused, naming the field
    five = ["--methods", "alti,norm,grad_rollout,value_zeroing,raw"]
    common = [str(texts), "--out", str(out), "--no-progress", *five]
    for options, field in ((["--references", "blankout", "--seed", "4"], "seed"),
                           (["--references", "blankout", "--seed", "3", "--blank", "unk"], "blank"),
                           (["--references", "blankout", "--seed", "3", "--special", "include"], "special"),
                           (["--references", "blankout,grad_norm_proj", "--seed", "3"], "references")):
        assert main(["evaluate", *common, *options]) == 1
        assert f"{field} (stored" in capsys.readouterr().err
    assert main(["evaluate", *base, "--methods", "alti,norm"]) == 1  # fewer methods
    assert "a re-run may add methods but not drop any" in capsys.readouterr().err

    # a line whose text changed (same id) is computed again, not resumed from the old text's result
    texts.write_text('{"text": "The keys are over there.", "id": "keys"}\n' + TEXTS[1] + "\n")
    assert main(["evaluate", *base, "--methods", "alti,norm,grad_rollout,value_zeroing,raw"]) == 0
    captured = capsys.readouterr()
    assert "another text or label" in captured.err and "(1 already done)" in captured.out
    assert json.loads((out / "examples" / "keys.json").read_text())["text"] == "The keys are over there."

    # the output lock: a second run into the same directory is refused at once
    with holding(out):
        assert main(["evaluate", *base, "--methods", "alti,norm,grad_rollout,value_zeroing,raw"]) == 1
    assert "in use by another" in capsys.readouterr().err


@pytest.mark.slow
def test_methods_all_and_a_failed_run_leave_nothing_that_blocks(tmp_path, texts, capsys):
    out = tmp_path / "out"
    # a blank token outside the vocabulary fails in the first batch, after the model loaded
    assert main(["evaluate", str(texts), "--out", str(out), "--blank", "999999", "--no-progress"]) == 1
    assert "outside the model's vocabulary" in capsys.readouterr().err
    assert not (out / "settings.json").exists() and not list((out / "examples").iterdir())
    # the next run, with other settings and every method, is not blocked
    command = [str(texts), "--out", str(out), "--methods", "all", "--references", "blankout,grad_norm_proj",
               "--special", "include", "--no-progress"]
    assert main(["evaluate", *command]) == 0
    captured = capsys.readouterr()
    assert "special tokens ([CLS], [SEP]...): included" in captured.out
    assert "value_zeroing costs" in captured.err and "Jacobian" not in captured.err  # grad_norm_proj: one backward
    board = pandas.read_csv(out / "leaderboard.csv")
    assert set(board.reference) == {"blankout", "grad_norm_proj"}
    assert {"raw", "rollout", "flow", "alti", "norm", "grad_rollout", "value_zeroing", "random"} <= set(board.method)
    assert "Leaderboard against grad_norm_proj" in captured.out

"""`attnflow batch` / run_batch: input parsing, the Dask path on embedded clusters (threads and real worker
processes), values against direct computation, model-once-per-worker, kill-and-resume, malformed lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

import attnflow
from attnflow import OptionError
from attnflow._batch import load_example, read_inputs, run_batch, safe_name

WORDS = (
    "the keys to cabinet are on table a small dog ran across green field while children played near "
    "old river bank under bright summer sky"
).split()


def sentence(i: int) -> str:
    """A short distinct sentence; lengths vary from 3 to 9 words."""
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=3 + i % 7)).capitalize() + "."


def write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "attnflow.cli", "batch", *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )


# -- input parsing (no cluster, no model) ------------------------------------------------------------


def test_read_inputs_reports_each_malformed_line_by_number(tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [
        '\ufeff{"text": "first", "id": "a"}',      # 1: a BOM is fine
        '{"text": "no id"}',                       # 2: id defaults to the line number
        "",                                        # 3: blank lines are ignored
        "{not json",                               # 4
        '["text", "a list"]',                      # 5
        '{"id": "x"}',                             # 6
        '{"text": "   "}',                         # 7
        '{"text": 12}',                            # 8
        '{"text": "dup", "id": "a"}',              # 9
        '{"text": "bad id", "id": [1]}',           # 10
        '{"text": "int id", "id": 7}',             # 11
        '{"text": "clashes with line 2", "id": 2}',  # 12
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff"}\n')  # 13: bad UTF-8
    examples, malformed = read_inputs(path)
    assert [(e.id, e.line, e.text) for e in examples] == [("a", 1, "first"), ("2", 2, "no id"), ("7", 11, "int id")]
    reasons = {m.line: m.reason for m in malformed}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 12, 13]
    assert "not valid JSON" in reasons[4] and "JSON object" in reasons[5] and "no \"text\"" in reasons[6]
    assert "empty" in reasons[7] and "must be a string" in reasons[8] and "UTF-8" in reasons[13]
    assert "duplicate id 'a' (first used on line 1)" in reasons[9]
    assert "duplicate id '2'" in reasons[12] and "\"id\" must be" in reasons[10]
    assert str(malformed[0]).startswith("line 4: ")


def test_safe_names_are_plain_or_hashed_and_distinct():
    assert safe_name("doc-1.v2_b") == "doc-1.v2_b"
    ids = ["a/b", "a_b", "A_b", "a b", "..", ".hidden", "con", "x" * 300, "résumé", "Doc 7/b", "a\\b", ""]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert len({n.lower() for n in names}) == len(ids)  # case-insensitive filesystems too
    for name in names:
        assert len(name) <= 80 and name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name), name
        assert name.isascii()


def test_options_are_checked_before_anything_runs(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(OptionError, match="methods"):
        run_batch(path, tmp_path / "out", methods="rollout,attention")
    with pytest.raises(OptionError, match="sources"):
        run_batch(path, tmp_path / "out", sources="first")
    with pytest.raises(OptionError, match="No model directory"):
        run_batch(path, tmp_path / "out", model="./no-such-model")
    assert not (tmp_path / "out").exists()


# -- the Dask path, in-process cluster (fast start) ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    adapter = attnflow.get_adapter("transformers")
    from attnflow._models import packaged_model_dir

    model, tokenizer = adapter.load_model(packaged_model_dir())
    return adapter, model, tokenizer


def direct(minilm, text, sources=(0,)):
    """raw, rollout and flow computed directly on a capture of ``text`` alone."""
    adapter, model, tokenizer = minilm
    trace = attnflow.capture(model, adapter=adapter, tokens=tokenizer, **adapter.encode(tokenizer, [text]))
    return trace, {
        "raw": attnflow.raw(trace)[0],
        "rollout": attnflow.rollout(trace)[0],
        "flow": attnflow.flow(trace, sources=list(sources))[0],
    }


@pytest.fixture
def threads_cluster():
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None, silence_logs=40
    ) as cluster, distributed.Client(cluster) as client:
        yield cluster, client


@pytest.mark.slow
def test_outputs_equal_direct_computation(tmp_path, minilm, threads_cluster):
    _, client = threads_cluster
    texts = [sentence(i) for i in range(7)] + ["The keys to the cabinet are on the table."]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"ex-{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    summary = run_batch(path, out, methods="raw,rollout,flow", batch_size=3, client=client)
    assert (summary.done, summary.skipped, summary.failed, summary.malformed) == (8, 0, [], [])

    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert list(table.columns) == ["id", "token_index", "token", "method", "layer", "source", "score"]
    for i, text in enumerate(texts):
        trace, expected = direct(minilm, text)
        n = trace.seq_len
        stored = load_example(out, f"ex-{i}")
        assert stored["text"] == text and stored["tokens"] == trace.tokens[0] and stored["layers"] == [5]
        got = stored["matrices"]
        assert got["raw"].shape == got["rollout"].shape == (n, n) and got["flow"].shape == (1, n)
        for method in ("raw", "rollout", "flow"):
            np.testing.assert_allclose(got[method], expected[method], atol=2e-6, err_msg=method)
        rows = table[table["id"] == f"ex-{i}"]
        assert len(rows) == 3 * n and set(rows["layer"]) == {5} and set(rows["source"]) == {0}
        for method, row in (("raw", expected["raw"][0]), ("rollout", expected["rollout"][0]), ("flow", expected["flow"][0])):
            part = rows[rows["method"] == method].sort_values("token_index")
            assert list(part["token_index"]) == list(range(n)) and list(part["token"]) == trace.tokens[0]
            np.testing.assert_allclose(part["score"].to_numpy(), row, atol=2e-6, err_msg=method)
    assert summary.rows == len(table) and json.loads((out / "summary.json").read_text())["done"] == 8


@pytest.mark.slow
def test_existing_scheduler_all_layers_and_per_example_failures(tmp_path, minilm, threads_cluster):
    """--scheduler: connect to a running cluster by address. Also: every layer kept, negative sources,
    an example whose source is out of range fails alone, and a changed text is recomputed on resume."""
    cluster, _ = threads_cluster
    texts = {"short": "Hi there.", "long": sentence(5), "other": sentence(6)}
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "text": t} for k, t in texts.items()])
    out = tmp_path / "out"
    options = {"methods": ["rollout", "flow"], "sources": [0, 5, -1], "all_layers": True, "scheduler": cluster.scheduler_address}
    summary = run_batch(path, out, batch_size=2, **options)
    assert summary.done == 2 and [i for i, _ in summary.failed] == ["short"]  # "Hi there." has 5 tokens
    assert "source 5 is out of range" in summary.failed[0][1]
    trace, _ = direct(minilm, texts["long"])
    n = trace.seq_len
    got = load_example(out, "long")
    assert got["layers"] == list(range(6)) and got["positions"] == [0, 5, n - 1]
    np.testing.assert_allclose(got["matrices"]["rollout"], attnflow.rollout(trace, all_layers=True)[:, 0], atol=2e-6)
    np.testing.assert_allclose(
        got["matrices"]["flow"], attnflow.flow(trace, sources=[0, 5, -1], all_layers=True)[:, 0], atol=2e-6
    )
    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert len(table[table["id"] == "long"]) == 2 * 6 * 3 * n and "short" not in set(table["id"])

    # Resume after editing one text: only that example is recomputed; the failure is retried and fails again.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "examples").iterdir()}
    texts["other"] = sentence(16)
    write_jsonl(path, [{"id": k, "text": t} for k, t in texts.items()])
    again = run_batch(path, out, batch_size=2, **options)
    assert (again.done, again.skipped, len(again.failed)) == (1, 1, 1)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "examples").iterdir()}
    assert after["long.safetensors"] == before["long.safetensors"] and after["other.safetensors"] > before["other.safetensors"]
    assert load_example(out, "other")["text"] == texts["other"]

    with pytest.raises(OptionError, match="other settings"):
        run_batch(path, out, **{**options, "all_layers": False})


@pytest.mark.slow
def test_model_is_loaded_once_per_worker(tmp_path, monkeypatch, threads_cluster):
    """Count real load_model calls per worker: 12 one-example tasks on 2 workers must load twice in all."""
    import distributed

    _, client = threads_cluster
    adapter_class = type(attnflow.get_adapter("transformers"))
    original = adapter_class.load_model
    loads: Counter[str] = Counter()

    def counting_load(self, location):
        loads[distributed.get_worker().address] += 1
        return original(self, location)

    monkeypatch.setattr(adapter_class, "load_model", counting_load)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": sentence(i)} for i in range(12)])
    summary = run_batch(path, tmp_path / "out", methods="rollout", batch_size=1, client=client)
    assert summary.done == 12
    workers = set(client.nthreads())
    assert set(loads) <= workers and all(count == 1 for count in loads.values()), loads
    assert summary.model_loads == dict(loads)
    assert sum(loads.values()) <= 2 < 12  # loading per task would count 12


@pytest.mark.slow
def test_a_model_that_fails_to_load_stops_the_run_and_locks_nothing(tmp_path, threads_cluster):
    _, client = threads_cluster
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": sentence(i)} for i in range(3)])
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    with pytest.raises(attnflow.AdapterError, match="could not load the model"):
        run_batch(path, tmp_path / "out", model=not_a_model, methods="rollout", client=client)
    assert not list((tmp_path / "out" / "examples").iterdir())
    summary = run_batch(path, tmp_path / "out", methods="rollout", client=client)  # other settings: allowed
    assert summary.done == 3


# -- real worker processes, through the command line --------------------------------------------------


@pytest.mark.slow
def test_cli_killed_and_resumed_with_worker_processes(tmp_path):
    """Kill a real `attnflow batch` run (2 worker processes) mid-way, re-run it: every example exists once,
    files written before the kill are kept as they were, the table matches, malformed lines are reported."""
    count = 40
    records = [{"id": f"t{i:02d}", "text": sentence(i)} for i in range(count)]
    records.insert(9, '{"id": "broken", "text": ')  # line 10
    records.insert(20, {"id": "t03", "text": "a duplicate id"})  # line 21
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    examples = out / "examples"
    args = (str(path), "--out", str(out), "--workers", "2", "--batch-size", "1", "--methods", "rollout,flow")

    first = run_cli(*args, start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and first.poll() is None:
            if examples.is_dir() and len(list(examples.glob("*.safetensors"))) >= 3:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before it could be killed:\n" + first.communicate()[1]
        os.killpg(first.pid, signal.SIGKILL)  # the driver and its worker processes, mid-run
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    written = {p.name: p.stat().st_mtime_ns for p in examples.glob("*.safetensors")}
    assert 3 <= len(written) < count, len(written)
    assert not (out / "scores.parquet").exists()

    second = run_cli(*args, "--no-progress")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert "line 10: not valid JSON" in stderr and "line 21: duplicate id 't03' (first used on line 4)" in stderr
    assert f"{count - len(written)} done, {len(written)} skipped, 2 malformed, 0 failed" in stdout

    files = sorted(p.name for p in examples.iterdir())
    assert files == sorted(f"t{i:02d}.safetensors" for i in range(count))  # each once, no temporary files
    for name, mtime in written.items():
        assert (examples / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["workers"]) == 2 and all(w.startswith("tcp://") for w in summary["workers"])
    assert set(summary["model_loads"].values()) == {1}  # each worker process loaded the model once

    import pyarrow.parquet as pq

    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert sorted(set(table["id"])) == [f"t{i:02d}" for i in range(count)]
    per_example = table.groupby(["id", "method"]).size().unstack()
    tokens = {f"t{i:02d}": len(load_example(out, f"t{i:02d}")["tokens"]) for i in range(count)}
    for method in ("rollout", "flow"):
        assert per_example[method].to_dict() == tokens  # one row per token: nothing duplicated or missing

    third = run_cli(*args, "--no-progress")
    stdout, _ = third.communicate(timeout=300)
    assert third.returncode == 0 and f"0 done, {count} skipped" in stdout


def test_lone_surrogates_are_malformed_lines(tmp_path):
    """JSON may escape a lone surrogate (\\udc80), which no UTF-8 file name or tokenizer can take."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"text": "fine", "id": "a"}\n'
        '{"text": "surrogate id", "id": "x\\udc80"}\n'
        '{"text": "surrogate \\ud800 text", "id": "b"}\n'
        '{"text": "also fine", "id": "c"}\n'
    )
    examples, malformed = read_inputs(path)
    assert [e.id for e in examples] == ["a", "c"]
    assert [m.line for m in malformed] == [2, 3]
    assert "\"id\"" in malformed[0].reason and "surrogate" in malformed[0].reason
    assert "\"text\"" in malformed[1].reason and "surrogate" in malformed[1].reason


# -- one run per output directory ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path, threads_cluster):
    """Two runs into one --out (different methods): exactly one proceeds; the other, from Python or from the
    command line, is refused at once with who holds the directory, and changes nothing in it."""
    import socket

    _, client = threads_cluster
    records = ["{broken"] + [{"id": f"e{i}", "text": sentence(i)} for i in range(3)]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    refusals = []

    def second_runs(_malformed):  # called by the first run while it holds the directory, before computing
        manifest = (out / "batch.json").read_bytes()
        with pytest.raises(attnflow.AttnflowError) as info:
            run_batch(path, out, methods="flow", client=client)
        refusals.append(str(info.value))
        cli = run_cli(str(path), "--out", str(out), "--methods", "flow", "--no-progress")
        stdout, stderr = cli.communicate(timeout=120)
        refusals.append((cli.returncode, stdout, stderr))
        assert (out / "batch.json").read_bytes() == manifest
        assert not list((out / "examples").glob("*.safetensors"))

    summary = run_batch(path, out, methods="rollout", client=client, on_malformed=second_runs)
    assert summary.done == 3 and len(refusals) == 2
    message, (status, stdout, stderr) = refusals
    assert f"pid {os.getpid()}" in message and socket.gethostname() in message and "--out" in message
    assert status == 1 and stdout == "" and "Traceback" not in stderr
    assert stderr.startswith("attnflow: error: ") and stderr.count("\n") == 1 and f"pid {os.getpid()}" in stderr
    assert json.loads((out / "batch.json").read_text())["settings"]["methods"] == ["rollout"]
    for i in range(3):
        assert set(load_example(out, f"e{i}")["matrices"]) == {"rollout"}
    again = run_batch(path, out, methods="rollout", client=client)  # released when the first run ended
    assert (again.done, again.skipped) == (0, 3)


# -- damaged example files -----------------------------------------------------------------------------


def _flip_byte(path, where):
    """Flip one byte of a safetensors file: in its JSON header (``where="header"``) or its array data."""
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    if where == "header":
        text = bytes(data[8 : 8 + header_length])
        offset = 8 + text.index(b"tokens") + 12  # inside the first token label
    else:
        offset = 8 + header_length + (len(data) - 8 - header_length) // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["data", "header"])
def test_a_flipped_byte_in_a_finished_example_is_recomputed_never_scored(where, tmp_path, threads_cluster):
    import pyarrow.parquet as pq

    _, client = threads_cluster
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"e{i}", "text": sentence(i)} for i in range(3)])
    out = tmp_path / "out"
    first = run_batch(path, out, methods="rollout,flow", client=client)
    assert first.done == 3
    clean = pq.read_table(out / "scores.parquet").to_pandas()
    _flip_byte(out / "examples" / "e1.safetensors", where)

    second = run_batch(path, out, methods="rollout,flow", client=client)
    assert (second.done, second.skipped, second.failed) == (1, 2, [])
    assert [example_id for example_id, _ in second.recomputed] == ["e1"]
    assert "damaged" in second.recomputed[0][1] and "checksum" in second.recomputed[0][1]
    assert json.loads((out / "summary.json").read_text())["recomputed"][0]["id"] == "e1"
    again = pq.read_table(out / "scores.parquet").to_pandas()
    columns = ["id", "token_index", "token", "method", "layer", "source"]
    assert again[columns].equals(clean[columns])
    # e1 now ran alone, not padded in a batch of three: equal up to float32 rounding
    np.testing.assert_allclose(again["score"], clean["score"], atol=2e-6)


def test_a_damaged_example_file_is_a_clean_error_when_loaded(tmp_path):
    from attnflow._batch import Example, _example_state, _settings, _write_example

    settings = _settings(
        adapter="transformers", model=None, methods="rollout", sources=[0], all_layers=False, head_fusion="mean",
        residual=0.5, discard_ratio=0.0, max_length=None, max_seconds=10.0, local=True,
    )
    (tmp_path / "examples").mkdir()
    example = Example(id="a", text="hi there", line=1, name="a")
    rollout = np.full((3, 3), 1 / 3, dtype=np.float32)
    result = {"arrays": {"rollout": rollout}, "tokens": ["[CLS]", "hi", "there"], "positions": [0], "layers": [5],
              "model_name": "m", "causal": False}
    _write_example(tmp_path, example, result, settings)
    np.testing.assert_array_equal(load_example(tmp_path, "a")["matrices"]["rollout"], rollout)
    _flip_byte(tmp_path / "examples" / "a.safetensors", "data")
    with pytest.raises(attnflow.TraceFileError, match="checksum"):
        load_example(tmp_path, "a")
    assert _example_state(tmp_path, example, settings.digest())[0] is False

    # A file of format version 1 (no checksums, as attnflow wrote before) is not trusted: it is recomputed.
    from safetensors.numpy import save_file

    old = {"format": "attnflow.batch-example", "version": 1, "id": "a", "text": "hi there",
           "text_sha256": example.text_sha256, "settings": settings.digest()}
    save_file({"rollout": rollout}, str(tmp_path / "examples" / "a.safetensors"), metadata={"attnflow": json.dumps(old)})
    done, why = _example_state(tmp_path, example, settings.digest())
    assert done is False and "older attnflow" in why

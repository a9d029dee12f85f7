"""`attnflow compare`'s text table: every per-head cell stays a separate column, flagged or not."""

from __future__ import annotations

import dataclasses

import numpy as np

import attnflow
from attnflow import AttentionTrace


def traces(differences):
    """Two 1-layer, 4-head traces whose heads differ by about ``differences[h]`` (max |diff|)."""
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(5), size=(1, 4, 5)).astype(np.float64)
    b = w.copy()
    for head, amount in enumerate(differences):
        b[0, head, 0, 0] += amount
        b[0, head, 0, 1] -= amount
    a_trace = AttentionTrace.from_arrays([w.astype(np.float32)])
    b_layer = dataclasses.replace(a_trace.layers[0], weights=b.astype(np.float32))
    return a_trace, AttentionTrace([b_layer], mask=a_trace.mask, tokens=a_trace.tokens)


def head_rows(table):
    lines = table.splitlines()
    start = lines.index("max|diff| per head (* = beyond tolerance):")
    return lines[start + 1], lines[start + 2]


def test_flagged_values_do_not_run_into_their_neighbours():
    a, b = traces([5.05e-3, 1.25e-2, 0.0, 1.0e-1])  # heads 0, 1 and 3 beyond the default 1e-5
    report = attnflow.compare(a, b, flow=False)
    assert report.failing_heads == [(0, 0), (0, 1), (0, 3)]
    header, row = head_rows(report.to_table())
    cells = row.split()
    assert cells[0] == "1" and len(cells) == 5, row  # the layer number (from 1), then one cell per head
    assert cells[1].endswith("*") and cells[2].endswith("*") and not cells[3].endswith("*") and cells[4].endswith("*")
    values = [float(cell.rstrip("*")) for cell in cells[1:]]
    np.testing.assert_allclose(values, [5.05e-3, 1.25e-2, 0.0, 1.0e-1], rtol=0.01)
    # the columns line up under their headers
    for h in range(4):
        label = header.index(f"h{h}") + len(f"h{h}")
        assert row[label - 1] != " ", (header, row)

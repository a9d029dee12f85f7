"""Dataset-scale explanations on Dask: [`run_batch`][attnflow.run_batch], which ``attnflow batch`` wraps.

The run reads a JSONL input (`._inputs`), checks and records its settings (`._settings`), has
Dask workers capture and explain batches of examples (`._worker`), and keeps per example an
[`attnflow.Explanation`][attnflow.Explanation] file plus one Parquet score table in the output directory (`._store`);
`._driver` ties them together.
"""

from ._driver import BatchSummary, run_batch
from ._inputs import Example, Malformed, read_inputs, safe_name
from ._store import OutputInUseError, load_example

__all__ = [
    "BatchSummary", "Example", "Malformed", "OutputInUseError", "load_example", "read_inputs", "run_batch",
    "safe_name",
]

# make demo: install, then explain a sentence with the packaged MiniLM model.
# make test: install, then lint, install headless Chromium if missing (system-deps), and run the whole suite.
# constraints.txt pins torch (CPU build from local disk), ruff and mypy (lint rules change between releases) and the JAX model
# libraries the adapters are tested with (penzai, flaxmodels, gemma and what they import).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint docs bench bench-long clean system-deps

$(STAMP): pyproject.toml constraints.txt examples/plugin/pyproject.toml examples/method_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# the test extra includes interop (transformer-lens==3.9.0, nnsight==0.8.1: about 27 packages, no torch; checked
	# with pip install --dry-run against the pinned CPU torch above)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	# timm without its dependencies: its torchvision requirement has no CPU build on this index, and a
	# CUDA torchvision beside the CPU torch breaks transformers' imports (see tests/timm_import.py).
	$(PY) -m pip install -q --no-deps -c constraints.txt timm
	# JAX model libraries with adapters (penzai comes with the test extra). flaxmodels without its dependencies:
	# it asks for the Python 3.6 dataclasses backport; it imports h5py and requests. gemma and kauldron without
	# theirs: a full install cannot be resolved against the protobuf pin (kauldron -> xmanager -> protobuf<7) and
	# pulls TensorFlow; these are the light packages gemma.gm.nn imports (TensorFlow: see tests/gemma_import.py).
	$(PY) -m pip install -q -c constraints.txt h5py requests
	$(PY) -m pip install -q --no-deps -c constraints.txt flaxmodels gemma kauldron einops clu jaxtyping wadler-lindig \
		lark typeguard immutabledict sentencepiece chex ml-collections wrapt
	# the worked plugin packages (an adapter, a method), installed as a third party would install theirs (their
	# tests run with ours)
	$(PY) -m pip install -q --no-deps -e examples/plugin -e examples/method_plugin
	touch $(STAMP)

# The flow kernel compiled into numba's on-disk cache (attnflow/network/__pycache__), so that a new process's
# first flow() loads it in under a second instead of compiling for 10-20 s; redone when the kernel changes.
KERNEL_CACHE := $(VENV)/.flow-kernel
$(KERNEL_CACHE): $(STAMP) attnflow/network/_dinic.py
	$(PY) -m attnflow.network._compile
	touch $(KERNEL_CACHE)

install: $(STAMP) $(KERNEL_CACHE)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/attnflow explain "The keys to the cabinet are on the table." --methods raw,rollout,flow,alti --html --out attnflow-out

# mypy type-checks the core package and adapters/ (settings in pyproject.toml, [tool.mypy]). adapters/ is glue to
# torch, JAX/Flax and the model libraries, whose type information is partial: where a framework's stubs are missing
# or wrong, the call carries a narrow `# type: ignore[code]` with a comment saying why.
lint: install
	$(VENV)/bin/ruff check attnflow adapters tests examples benchmarks
	$(VENV)/bin/mypy

# The API reference from the docstrings, into build/site; strict: any warning fails (tests/test_docs.py too).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# The HTML page is tested in a real browser: headless Chromium and its driver from Debian's packages.
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && apt-get install -y chromium chromium-driver)

# One BLAS thread: the suite's matrices are small, and a multi-threaded OpenBLAS on a busy 2-core machine
# spends 30x longer spinning than computing (an SVD of 128 x 384 took 0.7 s instead of 0.02 s).
test: lint system-deps
	HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_flow.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_streams.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_methods.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_generation.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_first_call.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_estimate.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_memory.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_capture.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_page.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_jax_capture.py

# The long-input figures (tens of minutes on 2 cores): 32 x 2048 causal flow, 4096-token capture.
bench-long: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_causal.py --long
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_long_capture.py

clean:
	rm -rf $(VENV) attnflow-out .pytest_cache .ruff_cache

# make demo: install, then explain a sentence with the packaged MiniLM model.
# make test: install, then lint and run the whole suite.
# constraints.txt pins torch (CPU build from local disk), ruff (lint rules change between releases) and the JAX model
# libraries the adapters are tested with (penzai, flaxmodels, gemma and what they import).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt examples/plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
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
	# the worked plugin package, installed as a third party would install theirs (its tests run with ours)
	$(PY) -m pip install -q --no-deps -e examples/plugin
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/attnflow explain "The keys to the cabinet are on the table." --out attnflow-out

lint: $(STAMP)
	$(VENV)/bin/ruff check attnflow adapters tests examples benchmarks

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_flow.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_streams.py

clean:
	rm -rf $(VENV) attnflow-out .pytest_cache .ruff_cache

# eap-bench: `make bench` runs the main job on the embedded default model, `make test` the tests.
# Both create the virtual environment in .venv and install everything on first use.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# The CPU wheel of torch (pinned: an unpinned torch pulls a several-GB CUDA build). With a GPU,
# install your CUDA torch into .venv first; it is kept (see README).
TORCH  ?= torch==2.13.0

.PHONY: install test bench bench-gate bench-pytest thresholds sample clean

# The tests use the [ray] extra (the Ray executor; pip install 'eap-bench[ray]' elsewhere).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[ray]"
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	$(PY) -m bench run

bench-pytest: install
	$(PY) -m pytest --benchmark -q -s tests/test_benchmarks.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .benchmarks

# The CI fidelity gate: computes the cells bench/thresholds.json names, exits 1 on any failure.
bench-gate: install
	$(PY) -m bench gate --run runs/gate

# Regenerate bench/thresholds.json by the protocol in bench/gate.py (refuses a dirty tree).
thresholds: install
	HF_HUB_OFFLINE=1 $(PY) -m bench thresholds --run

# Regenerate docs/sample/ from a clean tree: the default matrix, then its tables and figures.
sample: install
	@test -z "$$(git status --porcelain)" || { echo "sample: commit first (the sample records the commit)"; exit 1; }
	rm -rf runs/sample
	$(PY) -m bench run --out runs/sample --threads 1
	rm -rf docs/sample && mkdir -p docs/sample
	cp runs/sample/results.json runs/sample/results.csv runs/sample/summary.md docs/sample/
	cp runs/sample/figures/*.png docs/sample/
	cp runs/sample/figures/scatter_*.pdf docs/sample/

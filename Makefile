# edgediff — set-up, demo and tests. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all edge-check gpu-resolve bindings gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel lies on local disk; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,export,test,fp16,sign,plot,distributed]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgediff demo --out demo.png

test: $(STAMP) bindings
	$(PY) -m pytest -q -m "not slow" -n 2

test-all: $(STAMP) bindings
	$(PY) -m pytest -q -n 2

# The real TensorRT 10/11 and cuda-python 12/13 bindings, importable on a CPU, for the name
# check (tests/runtime/test_trt_names.py); ~75 MB under build/bindings, fetched once.
bindings: $(STAMP)
	$(PY) scripts/trt_bindings.py

# The edge story: a fresh venv with `pip install '.[cpu]'` (ONNX Runtime, no torch) runs a
# bundle exported by the development venv.
edge-check: $(STAMP)
	rm -rf build/edge-venv && $(PYTHON) -m venv build/edge-venv
	build/edge-venv/bin/pip install -q '.[cpu]'
	build/edge-venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
	$(VENV)/bin/edgediff export --family ddpm --size tiny --out build/edge-bundle
	build/edge-venv/bin/edgediff generate build/edge-bundle -n 20 --guidance 2 --out build/edge.png --npz build/edge.npz

# Each gpu-* extra resolves (pip --dry-run, metadata only) to one ONNX Runtime and one CUDA major.
gpu-resolve: $(STAMP)
	$(PY) scripts/gpu_resolve.py

# On a GPU machine: every digits family through every GPU stack importable (native TensorRT,
# ONNX Runtime's CUDA/TensorRT providers, CuPy), one table; elsewhere: all skipped, with reasons.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --json build/gpu-check/report.json

clean:
	rm -rf $(VENV) build .pytest_cache

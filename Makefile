# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# What `make demo` needs: the package and onnxruntime ([cpu]); `make test` adds the [test] extra.
DEMO_STAMP := $(VENV)/.installed-cpu

.PHONY: demo test test-quick clean

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu]"
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP) $(DEMO_STAMP)

# Train the default ViT on the offline digits, then export it to ONNX and TFLite and verify each file
# against Keras (reports beside them). Installs only what that needs (.[cpu]), nothing from [test].
# After the install: 2 min 9 s on 2 CPU cores, 99.44% test top-1 (BENCHMARKS.md, "Training on digits").
demo:
	@test -f $(STAMP) -a $(STAMP) -nt pyproject.toml || $(MAKE) --no-print-directory $(DEMO_STAMP)
	$(VENV)/bin/vitcli train --dataset digits
	$(VENV)/bin/vitcli export --format onnx
	$(VENV)/bin/vitcli export --format tflite
	$(VENV)/bin/vitcli export --format tflite --quantize int8

# Test processes (pytest-xdist): 2 suits the 2-core CI machine, where the suite's subprocesses,
# compilations and small-model ops leave a core idle much of the time; `make test TEST_WORKERS=0` runs
# serially. --dist loadfile keeps each file's tests in one process, so a file's module-scoped fixtures
# (the killed-and-resumed CLI run) and cached models are made once.
TEST_WORKERS ?= 2

# The CI command: lint, then every test.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# The inner loop: lint and the tests neither slow nor in a JAX or PyTorch subprocess.
test-quick: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not jax and not torch" tests

clean:
	rm -rf $(VENV) build dist *.egg-info

# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Train the default ViT on the offline digits (>= 98% test top-1 in about 75 s of training on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/vitcli train --dataset digits
	# deployment: export the digits model and check each file against Keras (reports beside them)
	$(VENV)/bin/vitcli export --format onnx
	$(VENV)/bin/vitcli export --format tflite
	$(VENV)/bin/vitcli export --format tflite --quantize int8

# The CI command: lint, then every test.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The inner loop: lint and the tests neither slow nor in a JAX or PyTorch subprocess.
test-quick: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow and not jax and not torch" tests

clean:
	rm -rf $(VENV) build dist *.egg-info

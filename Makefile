# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if needed, then run the main job: the toy pipeline (jaxpatience demo, 6-8 min on 2 cores)
#   make test   create .venv if needed, then run lint and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 first: the CPU wheel, used only as the test reference (a plain `torch` pulls CUDA).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jaxpatience demo --out out/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# libtpu (the [tpu] extra) lets the sharding lab's tests compile for abstract TPU devices; no TPU is needed.
TPU_STAMP := $(VENV)/.tpu-installed
$(TPU_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[tpu]'
	touch $(TPU_STAMP)

test: $(STAMP) $(TPU_STAMP) lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) out

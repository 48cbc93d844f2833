# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if needed (the package only), then run the main job: the toy pipeline (jaxpatience demo)
#   make test   create .venv if needed, add the test tools (PyTorch CPU, pytest, ruff, libtpu, the CUDA plugin), run
#               lint and the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

# The demo needs only the package; the tests add the PyTorch reference (its CPU wheel), their extras and libtpu.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# --no-compile: no bytecode for every installed file up front (it halves the install); Python compiles what it imports.
	$(BIN)/pip install --quiet --no-compile -e .
	touch $(STAMP)

TEST_STAMP := $(VENV)/.test-installed
$(TEST_STAMP): $(STAMP)
	# torch==2.13.0 first: the CPU wheel, used only as the test reference (a plain `torch` pulls CUDA).
	$(BIN)/pip install --quiet torch==2.13.0
	# libtpu (the [tpu] extra) lets the sharding lab's tests compile for abstract TPU devices; no TPU is needed.
	# lm-eval (the [lmeval] extra) is the reference and the client of the lm-eval tests.
	$(BIN)/pip install --quiet -e '.[test,tpu,lmeval]'
	# JAX's CUDA plugin, pinned to the jax just installed: the GPU-compile tests build programs for abstract H100s
	# with XLA's real GPU compiler (planning/gpus.py); no GPU is needed, none is used.
	$(BIN)/pip install --quiet "jax[cuda12]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"
	# The tests start many processes: byte-compile the environment once (the package's own install skipped it).
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true  # a file that does not compile is never imported
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/jaxpatience demo --out out/demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) out

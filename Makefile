# The two commands: `make reproduce` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= results

.PHONY: venv reproduce test test-all bench bench-quick bench-llm figures mutation clean-venv

$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python -m fedlora.bench --out $(OUT)/bench

bench-quick: $(STAMP)
	$(BIN)/python -m fedlora.bench --quick --out $(OUT)/bench

bench-llm: $(STAMP)
	$(BIN)/python -m llm_scale.bench --out $(OUT)/bench

reproduce: $(STAMP)
	$(BIN)/python -m fedlora.reproduce --out $(OUT)/reproduce

figures: $(STAMP)
	$(BIN)/python -m figures --results $(OUT) --out $(OUT)/figures

# Opt-in, not in CI: mutation testing of the core (SUITE=core|loop|all), mutmut installed on demand;
# writes results/quality/mutation.json and results/quality/surviving.md (tools/mutation_report.py).
SUITE   ?= all
mutation: $(STAMP)
	$(BIN)/python -c "import importlib.metadata as m; assert m.version('mutmut') == '3.8.1'" 2>/dev/null \
		|| $(BIN)/pip install -q "mutmut==3.8.1"
	OMP_NUM_THREADS=1 nice -n 15 $(BIN)/python tools/mutation_report.py --suite $(SUITE)

clean-venv:
	rm -rf $(VENV)

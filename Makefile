# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# the demo runs Prefect in ephemeral mode: its first start migrates a database (slow on busy cores)
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PIP) install --no-deps mediapipe==0.10.21 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import avatarflow, prefect, mediapipe, segmind"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/avatarflow demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	-$(BIN)/avatarflow local down
	rm -rf $(VENV) .avatarflow

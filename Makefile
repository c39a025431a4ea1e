# Two entry points a newcomer needs: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint serve sim clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

demo: $(VENV)/.runtime
	$(BIN)/comfyfleet demo --jobs 4

serve: $(VENV)/.runtime
	$(BIN)/comfyfleet serve

sim: $(VENV)/.runtime
	$(BIN)/comfyfleet sim --backends 2 --port 8288

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# The tests mostly wait (on sockets, processes, Chromium): three pytest-xdist workers, each
# with its own PostgreSQL, S3 server and ports (tests/support.py `free_ports`), take about
# half the time even on two cores; worksteal evens out the files' very unequal lengths.
test: lint
	$(BIN)/pytest -q -rs -n 3 --dist worksteal

clean:
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache

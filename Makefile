# The two commands of the README: `make demo` and `make test`. Both set up on first use.
VENV ?= .venv
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist), one test module each at a time (--dist loadfile):
# most of the suite waits on servers, so two at once on the 2-core CI machine take ~2/3 of the time.
PYTEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh

demo: setup
	$(VENV)/bin/xdc demo

test: setup lint
	$(VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The edit loop: the layer contracts and the tests that need no server (about a minute).
test-fast: setup lint
	$(VENV)/bin/python -m pytest -m "not servers" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .xdc test-output

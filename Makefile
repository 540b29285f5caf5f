# The two commands of the README: `make demo` and `make test`. Both set up on first use.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh

demo: setup
	$(VENV)/bin/xdc demo

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .xdc test-output

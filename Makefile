# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv and install what they need on first use.
VENV ?= .venv
PYTEST_ARGS ?=
# Two test workers (pytest-xdist): tests sharing an expensive fixture stay on one (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/appliance quickstart

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

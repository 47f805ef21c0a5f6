# meshlane: `make demo` builds the lab and shows the mesh; `make test` runs every tier.
PY := .venv/bin/python
PYTEST := .venv/bin/pytest

.PHONY: deps demo test test-unit test-root bench check-generated clean-lab

deps:
	@sh scripts/install-deps.sh

demo: deps
	@$(PY) -m meshlane.demo

test: deps check-generated
	$(PYTEST) -v -ra tests

test-unit: deps
	$(PYTEST) -q tests/unit

test-root: deps
	$(PYTEST) -v -ra -m root tests

check-generated: deps
	@$(PY) -m fastpath.abi --check

clean-lab: deps
	@$(PY) -m meshlane.cli lab down

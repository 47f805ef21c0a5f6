# meshlane: `make demo` builds the lab and shows the mesh; `make test` runs every tier;
# `make bench` measures (bench/results/; `make bench BENCH_ARGS=--quick` for a smoke run).
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

bench: deps
	@$(PY) -c "import matplotlib" 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.l7 $(BENCH_L7_ARGS)

.PHONY: bench-l7
# L7 waypoint HTTP benchmark (bench/results/l7-latest.*; BENCH_L7_ARGS=--quick for a smoke run)
bench-l7: deps
	$(PY) -m bench.l7 $(BENCH_L7_ARGS)

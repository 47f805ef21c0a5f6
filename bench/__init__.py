"""`make bench`: meshlane's benchmark harness (not a test: nothing here asserts a timing).

    run.py        the CLI (`python -m bench.run [--quick]`): builds its own lab, starts the
                  servers, runs every scenario round-robin and writes bench/results/
    scenarios.py  the scenarios (who talks to whom, which mesh processes are involved) and
                  the kernel-counter checks that prove each one took the path it claims
    tools.py      drivers and output parsers for iperf3, sockperf and connrate
    connrate.c    the new-connections-per-second tool (compiled at bench time into
                  bench/build/); connrate_fallback.py is its Python twin when no C compiler
    procstat.py   CPU seconds and peak RSS of the mesh processes, sampled from /proc
    report.py     medians over rounds, ratios, latest.json / latest.md and the PNG charts
    topology.yaml the bench lab
    peers.py, enrolment.py   Envoy peers and enrolment cost (owned by another module author)
"""

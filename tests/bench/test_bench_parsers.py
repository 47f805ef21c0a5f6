"""Checks of the bench's parsers, path checks and report on canned inputs (no root, no
lab, no timing); part of `make test`."""
from __future__ import annotations

import json

from bench import report, tools
from bench import scenarios as S

SOCKPERF_RTT = """\
sockperf: == version #3.7-no.git ==
sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=2001; ReceivedMessages=2001
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=1.548 sec; SentMessages=1549; ReceivedMessages=1549
sockperf: \x1b[2;35m====> avg-rtt=347.659 (std-dev=1028.385)\x1b[0m
sockperf: Summary: Round trip is 347.659 usec
sockperf: ---> <MAX> observation = 7623.586
sockperf: ---> percentile 99.999 = 7623.586
sockperf: ---> percentile 99.000 = 4960.760
sockperf: ---> percentile 90.000 =  956.439
sockperf: ---> percentile 50.000 =   25.958
sockperf: ---> <MIN> observation =   16.360
"""


def test_sockperf_round_trip_in_microseconds():
    r = tools.parse_sockperf(SOCKPERF_RTT)
    assert r["p50_us"] == 25.958 and r["p90_us"] == 956.439 and r["p99_us"] == 4960.760
    assert r["observations"] == 1549 and round(r["rate"]) == 1001


def test_sockperf_one_way_latency_is_refused():
    text = SOCKPERF_RTT.replace("Round trip is", "Latency is")
    assert "one-way" in tools.parse_sockperf(text)["error"]


def test_sockperf_unit_scaled():
    r = tools.parse_sockperf(SOCKPERF_RTT.replace("347.659 usec", "0.347659 msec"))
    assert r["p50_us"] == 25958.0


def test_sockperf_garbage():
    assert "error" in tools.parse_sockperf("sockperf: ERROR: connect failed")


def test_iperf3_json():
    doc = {"end": {"sum_received": {"bits_per_second": 2.5e9, "seconds": 4.0},
                   "sum_sent": {"retransmits": 3}}}
    assert tools.parse_iperf3(json.dumps(doc)) == {"gbps": 2.5, "retransmits": 3, "seconds": 4.0}
    assert tools.parse_iperf3(json.dumps({"error": "unable to connect"}))["error"].endswith("connect")
    assert "error" in tools.parse_iperf3("")


def test_connrate_output():
    line = ('{"tool": "c", "ok": 10, "errors": 1, "seconds": 1.0, "rate": 10.0, '
            '"lat_us": {"p50": 1, "p90": 2, "p99": 3}, "first_error": "connect: refused"}')
    r = tools.parse_connrate("noise\n" + line)
    assert r["rate"] == 10.0 and r["first_error"] == "connect: refused" and "error" not in r
    assert "error" in tools.parse_connrate(line.replace('"ok": 10', '"ok": 0'))


def _delta(**node1):
    return {"node1": node1, "node2": {}}


def test_path_checks():
    sc = S.BY_ID
    assert S.check_path(sc[1], _delta(connect_redirected=0, connect_fast=0), 5)["status"] == "ok"
    assert S.check_path(sc[1], _delta(connect_redirected=3, connect_fast=0), 5)["status"] == "invalid"
    assert S.check_path(sc[3], _delta(connect_redirected=0, connect_fast=7), 5)["status"] == "ok"
    assert S.check_path(sc[3], _delta(connect_redirected=7, connect_fast=0), 5)["status"] == "invalid"
    assert S.check_path(sc[3], _delta(connect_redirected=7), 5)["status"] == "fast path not available"
    assert S.check_path(sc[5], _delta(connect_redirected=7, connect_fast=0), 5)["status"] == "ok"
    assert S.check_path(sc[5], _delta(connect_redirected=7, connect_fast=1), 5)["status"] == "invalid"
    assert S.check_path(sc[4], _delta(connect_redirected=2, connect_fast=0), 5)["status"] == "invalid"
    assert S.check_path(sc[6], _delta(connect_redirected=0), 5, 9)["status"] == "ok"
    assert S.check_path(sc[6], _delta(connect_redirected=0), 5, 2)["status"] == "invalid"
    assert S.check_path(sc[6], _delta(connect_redirected=0), 5, None)["status"] == "invalid"


def test_envoy_streams_ignores_admin():
    assert S.envoy_streams({"http.hbone_server.downstream_rq_total": 4,
                            "http.admin.downstream_rq_total": 9}) == 4


def _run(rnd, gbps, p50, status="ok"):
    t = {"tput_1": {"gbps": gbps, "procs": {"ztunnel-node1": {"cpu_s": 1.0, "peak_rss_bytes": 2 << 20}}},
         "tput_4": {"gbps": gbps * 2}, "lat_1000": {"p50_us": p50, "p90_us": p50, "p99_us": p50},
         "lat_max": {"p50_us": p50, "p90_us": p50, "p99_us": p50}, "conn": {"rate": 100.0, "ok": 100}}
    return {"round": rnd, "tools": t, "path": {"status": status, "detail": "x"}}


def _doc():
    raw = {"scenarios": {"1": [_run(1, 10, 100), _run(2, 12, 110), _run(3, 11, 300)],
                         "3": [_run(1, 20, 50), _run(2, 22, 60, "invalid"), _run(3, 21, 55)],
                         "2": [], "4": [], "5": [], "6": []},
           "unavailable": {"6": "not available: test"}}
    header = {"date": "d", "cores": 2, "cpu_model": "cpu", "kernel": "k", "memory_gib": 1.0,
              "command": "c", "durations": {"rounds": 3, "bulk_s": 1, "omit_s": 0, "latency_s": 1,
                                            "conn_s": 1, "fixed_rate": 1000, "msg_bytes": 1024},
              "tools": {}, "loadavg_start": "0", "enrolment_counts": [10], "sidecar_counts": [10]}
    return {"header": header, "raw": raw,
            "enrolment": {"counts": {"10": {"total_vmrss_mib": 250.0, "total_pss_mib": 160.0}}},
            "sidecars": {"counts": {"10": {"total_vmrss_mib": 650.0, "total_pss_mib": 200.0}}}}


def test_summary_medians_and_invalid_marking():
    summ = report.summarise(_doc()["raw"])
    assert summ["1"]["tput_1_gbps"] == 11 and summ["1"]["lat_1000_p50_us"] == 110
    assert summ["3"]["status"] == "invalid"
    assert summ["6"]["status"] == "not available: test"
    r31 = next(r for r in report.ratios(summ) if r["label"] == "3 vs 1")
    assert r31["tput_1_gbps_ratio"] == 21 / 11 and r31["lat_1000_p50_added_us"] == 55 - 110
    assert not r31["valid"] and "invalid" in r31["note"]


def test_memory_and_markdown(tmp_path):
    doc = _doc()
    rows = report.memory_comparison(doc["enrolment"], doc["sidecars"], [10])
    assert rows[0]["sidecars_over_mesh_vmrss"] == 2.6
    doc["summary"] = report.summarise(doc["raw"])
    doc["ratios"] = report.ratios(doc["summary"])
    doc["memory"] = rows
    md = report.markdown(doc)
    assert "| 3 | meshlane fast path, same node | invalid |" in md
    assert "not available: test" in md

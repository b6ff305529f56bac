"""The /metrics text: conventions (HELP/TYPE once per family, units, _total counters), histograms,
process and build metrics, the oldest-ready age, and that the reference documents every family."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import queuekit
from queuekit import metrics
from queuekit.broker import Broker
from queuekit.consumer_metrics import BUCKETS, Recorder, Store, checked_report
from queuekit.leader import STEPDOWN_REASONS
from support.fakeclock import FakeClock

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def _stats(**queues):
    return {
        "queues": queues,
        "connections": 2,
        "durable": False,
        "journal_commits": 0,
        "auth_failures": 1,
        "connections_refused": {"max_connections": 3},
        "ready": True,
        "uptime_seconds": 1.5,
        "omitted": 0,
    }


def _queue(**over):
    base = dict.fromkeys(
        ("ready", "inflight", "delayed", "dead", "waiting", "enqueued", "acked", "nacked", "redelivered"), 0
    )
    return {**base, "dead_lettered": 0, "backlog": 0, "oldest_ready_age_seconds": 0.0, **over}


def _reported():
    store = Store()
    rec = Recorder()
    for seconds in (0.001, 0.3, 7.0):
        rec.observe("jobs", "ok", seconds, seconds * 2)
    rec.observe("jobs", "failed", 0.05, 0.0)
    rec.observe("gone", "ok", 1.0, 1.0)  # a queue /stats does not list: left out
    reporter, seq, queues, _ = checked_report(rec.next_report())
    store.add('weird"name\n', reporter, seq, queues)
    return store.snapshot()


def families(text: str) -> dict[str, str]:
    """name -> type, asserting each family has exactly one HELP and one TYPE line before its samples."""
    types: dict[str, str] = {}
    helps: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in types, f"second TYPE for {name}"
            assert name in helps, f"TYPE before HELP for {name}"
            types[name] = kind
        else:
            sample = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)", line).group(1)
            base = re.sub(r"_(bucket|sum|count)$", "", sample)
            assert sample in types or base in types, f"sample {line!r} has no TYPE"
    return types


def test_every_family_follows_the_conventions():
    text = metrics.render(_stats(jobs=_queue(ready=3, enqueued=9)), _reported())
    types = families(text)
    for name, kind in types.items():
        assert re.fullmatch(r"(queuekit|process)_[a-z0-9_]+", name), name
        assert (kind == "counter") == name.endswith("_total"), f"{name} is a {kind}"
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)(_|$)", name), f"{name}: use base units"
    assert types["queuekit_task_duration_seconds"] == "histogram"
    assert types["queuekit_task_wait_seconds"] == "histogram"
    assert types["queuekit_build_info"] == "gauge"
    assert f'queuekit_build_info{{version="{queuekit.__version__}",python="' in text
    assert 'queuekit_tasks_ready{queue="jobs"} 3' in text
    assert 'queuekit_connections_refused_total{reason="handshake_timeout"} 0' in text  # exists at 0


def test_histograms_are_cumulative_and_match_their_count():
    text = metrics.render(_stats(jobs=_queue()), _reported())
    buckets = re.findall(r'queuekit_task_duration_seconds_bucket\{queue="jobs",le="([^"]+)"\} (\d+)', text)
    assert [le for le, _ in buckets] == [repr(float(b)) for b in BUCKETS] + ["+Inf"]
    counts = [int(n) for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == 4
    assert 'queuekit_task_duration_seconds_count{queue="jobs"} 4' in text
    duration_sum = float(re.search(r'queuekit_task_duration_seconds_sum\{queue="jobs"\} (\S+)', text).group(1))
    assert duration_sum == pytest.approx(7.351)
    assert counts[0] == 1 and counts[BUCKETS.index(0.5)] == 3  # 0.001; 0.05 and 0.3 under 0.5
    assert 'queuekit_tasks_processed_total{queue="jobs",outcome="failed"} 1' in text
    assert 'queuekit_tasks_processed_total{queue="jobs",outcome="timeout"} 0' in text
    assert 'queue="gone"' not in text  # only queues /stats lists (same bound)
    # a label value is escaped, not allowed to break the line
    assert 'queuekit_consumer_tasks_processed_total{consumer="weird\\"name\\n",outcome="ok"} 4' in text


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_process_metrics_describe_this_process():
    text = metrics.render(_stats(), None)
    values = dict(re.findall(r"^(process_[a-z_]+) (\S+)$", text, re.MULTILINE))
    assert set(values) >= {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    }
    assert float(values["process_resident_memory_bytes"]) > 1024 * 1024
    assert 0 < int(values["process_open_fds"]) == len(os.listdir("/proc/self/fd"))  # both count listdir's own
    assert float(values["process_cpu_seconds_total"]) > 0
    # A fresh process says it started just now (clock ticks after boot + boot time, from /proc).
    code = "import time; from queuekit import metrics; print(metrics.read_proc().start_time_seconds, time.time())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV).stdout
    started, now = map(float, out.split())
    assert now - 5 < started <= now + 0.1


def test_proc_missing_leaves_those_metrics_out(tmp_path):
    assert metrics.read_proc(str(tmp_path)) == metrics.ProcStats(None, None, None, None)


def test_oldest_ready_age_is_the_front_of_the_ready_list():
    clock = FakeClock()
    broker = Broker(clock=clock)
    assert broker.stats() == {}
    broker.put_many("q", ['"a"'])
    clock.advance(10)
    broker.put_many("q", ['"b"', '"c"'])
    clock.advance(5)
    stats = broker.stats()["q"]
    assert stats["oldest_ready_age_seconds"] == pytest.approx(15)
    assert stats["backlog"] == 3
    (a,) = broker.get_many("q", 1)
    stats = broker.stats()["q"]
    assert stats["oldest_ready_age_seconds"] == pytest.approx(5)  # "a" is in flight now: "b" is next
    assert stats["backlog"] == 3 and stats["inflight"] == 1
    broker.ack_many("q", [a[0]])
    assert broker.stats()["q"]["backlog"] == 2
    broker.ack_many("q", [t[0] for t in broker.get_many("q", 2)])
    stats = broker.stats()["q"]
    assert stats["oldest_ready_age_seconds"] == 0.0 and stats["backlog"] == 0


def test_a_task_acked_while_ready_does_not_count_as_oldest():
    clock = FakeClock()
    broker = Broker(clock=clock)
    (old,) = broker.put_many("q", ['"old"'])
    clock.advance(100)
    broker.put_many("q", ['"new"'])
    clock.advance(1)
    broker.ack_many("q", [old])  # acked by id while still ready: a stale entry in the ready list
    assert broker.stats()["q"]["oldest_ready_age_seconds"] == pytest.approx(1)


def _leadership(leader: bool, elections: int = 0, connected: bool = True, open_failures: int = 0, **stepdowns: int):
    return {
        "leader": leader,
        "elections": elections,
        "stepdowns": stepdowns,
        "journal_connected": connected,
        "journal_open_failures": open_failures,
    }


def _standby(**over):
    """A standby's /stats (app.ServerApp.stats): no queues, no results, the server's counters."""
    stats = {**_stats(), "role": "standby", "ready": False, "leadership": _leadership(False)}
    del stats["omitted"]
    return {**stats, **over}


def test_a_standby_writes_no_queue_families_but_the_servers_and_leaderships():
    text = metrics.render(_standby(), _reported())  # reports kept from an earlier term: not written
    types = families(text)
    assert not [n for n in types if n.startswith(("queuekit_tasks_", "queuekit_task_", "queuekit_consumer_"))]
    assert not {"queuekit_gets_waiting", "queuekit_queue_oldest_ready_age_seconds", "queuekit_queues_omitted"} & set(
        types
    )
    assert "queuekit_leader 0\n" in text
    assert "queuekit_leader_elections_total 0\n" in text
    for reason in STEPDOWN_REASONS:  # every reason exists from the start, at 0
        assert f'queuekit_leader_stepdowns_total{{reason="{reason}"}} 0\n' in text
    assert "queuekit_ready 0\n" in text
    assert "queuekit_auth_failures_total 1\n" in text
    assert 'queuekit_connections_refused_total{reason="max_connections"} 3\n' in text
    assert types["queuekit_build_info"] == "gauge" and "process_cpu_seconds_total" in types
    assert types["queuekit_leader"] == "gauge" and types["queuekit_leader_stepdowns_total"] == "counter"
    assert "queuekit_journal_connected 1\n" in text and "queuekit_journal_open_failures_total 0\n" in text
    assert types["queuekit_journal_connected"] == "gauge"


def test_a_server_without_a_journal_session_says_so():
    """A standby (or a leader that stepped down) that cannot open a session to the database."""
    text = metrics.render(_standby(leadership=_leadership(False, connected=False, open_failures=7)), None)
    assert "queuekit_journal_connected 0\n" in text
    assert "queuekit_journal_open_failures_total 7\n" in text
    assert families(text)["queuekit_journal_open_failures_total"] == "counter"


def test_a_leader_writes_every_family_a_standby_does_and_its_terms():
    stats = {**_stats(jobs=_queue(ready=2)), "role": "leader"}
    stats["leadership"] = _leadership(True, 3, superseded=1, probe_failed=1)
    text = metrics.render(stats, _reported())
    assert set(families(text)) >= set(families(metrics.render(_standby(), None)))
    assert "queuekit_leader 1\n" in text
    assert "queuekit_leader_elections_total 3\n" in text
    assert 'queuekit_leader_stepdowns_total{reason="superseded"} 1\n' in text
    assert 'queuekit_leader_stepdowns_total{reason="lease_expired"} 0\n' in text
    assert 'queuekit_tasks_ready{queue="jobs"} 2\n' in text


def test_a_single_server_writes_no_leadership_families():
    text = metrics.render({**_stats(jobs=_queue()), "role": "single"}, None)
    assert not [n for n in families(text) if n.startswith(("queuekit_leader", "queuekit_journal_connected"))]
    assert "queuekit_journal_open_failures" not in text


def test_every_metric_family_is_in_the_reference():
    reference = REFERENCE.read_text()
    stats = {**_stats(jobs=_queue()), "role": "leader", "leadership": _leadership(True, 1)}
    names = families(metrics.render(stats, _reported()))
    missing = [n for n in names if f"`{n}`" not in reference]
    assert not missing, f"add these metrics to docs/reference.md (Metrics): {', '.join(missing)}"

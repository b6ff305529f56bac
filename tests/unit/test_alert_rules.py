"""monitoring/queuekit-alerts.rules.yml: valid for Prometheus (`promtool check rules`), its unit
tests pass (`promtool test rules`), those tests catch a broken rule (mutations below), and every
metric a rule or the Grafana dashboard names is one that /metrics writes. The dashboard: its
queries parse, its panels keep the conventions (unique ids, the data source variable, no overlap),
and the queries of the server-ready and leadership panels give what they should on made-up series.

promtool comes from Debian's `prometheus` package (.ci/run installs it). Without it these tests
skip, except under CI=true, where a missing promtool fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from queuekit import metrics
from queuekit.consumer_metrics import Recorder, Store, checked_report

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "queuekit-alerts.rules.yml"
RULE_TESTS = MONITORING / "queuekit-alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_rules_are_valid_and_their_unit_tests_pass():
    checked = run("check", "rules", RULES.name, cwd=MONITORING)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout
    tested = run("test", "rules", RULE_TESTS.name, cwd=MONITORING)
    assert tested.returncode == 0, tested.stdout + tested.stderr


# Each mutation breaks one alert the way a careless edit would; the unit tests must notice.
MUTATIONS = [
    ("increase(queuekit_tasks_dead_lettered_total[10m]) > 0", "queuekit_tasks_dead_lettered_total > 0"),
    ("queuekit_queue_oldest_ready_age_seconds > 600", "queuekit_queue_oldest_ready_age_seconds > 6000"),
    (" and (queuekit_tasks_inflight == 0)", ""),
    ("(queuekit_leader == 0)\n        for: 2m", "(queuekit_leader == 0)\n        for: 0m"),
    (" unless (queuekit_leader == 0)", ""),  # every standby would be "not ready"
    ('up{job="queuekit-server"} == 0', "up == 0"),
    ("max by (namespace, job) (queuekit_leader) == 0", "max(queuekit_leader) == 0"),  # one leader hides another job
    ("(queuekit_leader) == 0\n        for: 1m", "(queuekit_leader) == 0\n        for: 0m"),
    ("sum by (namespace, job) (queuekit_leader) > 1", "sum by (namespace, job) (queuekit_leader) > 0"),
    ("(queuekit_leader) > 1\n        for: 30s", "(queuekit_leader) > 1\n        for: 0s"),
    ("[15m])) >= 4", "[15m])) > 3"),  # 3 elections extrapolated read as more than 3
    ("increase(queuekit_leader_elections_total[15m])", "queuekit_leader_elections_total"),
    ("queuekit_journal_connected == 0\n        for: 2m", "queuekit_journal_connected == 0\n        for: 0m"),  # a blip
    ("queuekit_journal_connected == 0\n        for: 2m", "queuekit_journal_connected == 0\n        for: 5m"),
    ("expr: queuekit_journal_connected == 0", "expr: queuekit_journal_connected == 1"),
    # one server's working session would hide another's lost one
    ("expr: queuekit_journal_connected == 0", "expr: max by (namespace, job) (queuekit_journal_connected) == 0"),
]


@pytest.mark.parametrize("old, new", MUTATIONS, ids=[f"{m[0][:40]}->{m[1][-12:]}" for m in MUTATIONS])
def test_the_rule_tests_catch_a_broken_rule(tmp_path, old, new):
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    tested = run("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert tested.returncode != 0, f"promtool test rules still passes with {new!r} for {old!r}"
    assert "FAILED" in tested.stdout + tested.stderr


def written_metrics() -> set[str]:
    """Every sample name /metrics writes (histograms with _bucket/_sum/_count)."""
    rec = Recorder()
    rec.observe("q", "ok", 0.1, 0.1)
    store = Store()
    store.add("c", *checked_report(rec.next_report()))
    queue = dict.fromkeys(
        ("ready", "inflight", "delayed", "dead", "waiting", "enqueued", "acked", "nacked", "redelivered"), 0
    )
    stats = {
        "queues": {"q": {**queue, "dead_lettered": 0, "oldest_ready_age_seconds": 0.0}},
        "connections": 0,
        "durable": True,
        "journal_commits": 0,
        "ready": True,
        "uptime_seconds": 1.0,
        "role": "leader",
        "leadership": {
            "leader": True,
            "elections": 1,
            "stepdowns": {},
            "journal_connected": True,
            "journal_open_failures": 0,
        },
    }
    text = metrics.render(stats, store.snapshot())
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    return samples | {re.sub(r"_bucket$", "", s) for s in samples}  # a histogram's family name too


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:queuekit|process)_[a-z0-9_]+)", expr))


def panels(dashboard: dict) -> list[dict]:
    """Every panel, also those inside a row (a collapsed row keeps its panels under its own)."""
    return [q for p in dashboard["panels"] for q in (p, *p.get("panels", []))]


def exprs_of(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_rules_and_dashboard_name_only_metrics_that_exist():
    written = written_metrics()
    rules_used = names_in(RULES.read_text())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = exprs_of(dashboard)
    dashboard_used = set().union(*map(names_in, exprs))
    assert rules_used and dashboard_used
    assert not rules_used - written, f"rules name unknown metrics: {rules_used - written}"
    assert not dashboard_used - written, f"dashboard names unknown metrics: {dashboard_used - written}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query, with Grafana's variables filled in, as a recording rule: promtool parses it."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = exprs_of(dashboard)
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": e.replace("$__rate_interval", "5m")
            .replace("$", "")
            .replace('=~"instance"', '=~".*"')
            .replace('=~"queue"', '=~".*"')
            .replace('=~"job"', '=~".*"'),
        }
        for i, e in enumerate(exprs)
    ]
    assert not any("$" in r["expr"] or '=~"instance"' in r["expr"] for r in rules)
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    checked = run("check", "rules", path.name, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout


def test_the_server_ready_panel_leaves_standbys_out(tmp_path):
    """A standby is never ready (by design): the stat shows the leader's readiness, and a single
    server's as before (promtool evaluates the panel's query on made-up series)."""
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p.get("title") == "Server ready"]
    expr = panel["targets"][0]["expr"].replace('=~"$instance"', '=~".*"')

    def case(single_ready: int) -> dict:
        series = {
            'queuekit_ready{job="ha",instance="leader:8080"}': 1,
            'queuekit_leader{job="ha",instance="leader:8080"}': 1,
            'queuekit_ready{job="ha",instance="standby:8080"}': 0,
            'queuekit_leader{job="ha",instance="standby:8080"}': 0,
            'queuekit_ready{job="single",instance="single:8080"}': single_ready,
        }
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": f"{v}x5"} for s, v in series.items()],
            "promql_expr_test": [
                {"expr": expr, "eval_time": "2m", "exp_samples": [{"labels": "{}", "value": single_ready}]}
            ],
        }

    (tmp_path / "none.rules.yml").write_text("groups: []\n")
    (tmp_path / "panel.test.yml").write_text(
        json.dumps({"rule_files": ["none.rules.yml"], "tests": [case(1), case(0)]})
    )
    tested = run("test", "rules", "panel.test.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_panels_keep_the_conventions():
    """Unique ids, every panel and query on the data source variable, and no two panels on the
    same cells of Grafana's 24-column grid."""
    dashboard = json.loads(DASHBOARD.read_text())
    every = panels(dashboard)
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    owner: dict[tuple[int, int], int] = {}
    for p in every:
        if p["type"] != "row":
            assert p["datasource"] == DATASOURCE, p["title"]
            assert p["targets"] and all(t["datasource"] == DATASOURCE for t in p["targets"]), p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"{p['title']}: refIds must be unique"
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for cell in ((x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])):
            other = owner.setdefault(cell, p["id"])
            assert other == p["id"], f"panel {p['id']} ({p['title']!r}) overlaps panel {other} at {cell}"


LEADERSHIP_PANELS = (
    "Role by server",
    "Journal session by server",
    "Elections and step-downs",
    "Failed journal session opens",
)


def filled(expr: str) -> str:
    """A panel query with Grafana's variables as "everything"."""
    return expr.replace('=~"$instance"', '=~".*"').replace('=~"$job"', '=~".*"').replace("$__rate_interval", "5m")


def test_the_leadership_panels_show_each_server(tmp_path):
    """The leadership row's panels query every leadership family, and on made-up series (two
    servers of one journal, a single server beside them) give one series per server of the
    journal, the step-downs by reason, and nothing for the single server."""
    dashboard = json.loads(DASHBOARD.read_text())
    by_title = {p.get("title"): p for p in panels(dashboard)}
    assert "Leadership (several servers on one PostgreSQL journal)" in by_title
    exprs = {t: [filled(q["expr"]) for q in by_title[t]["targets"]] for t in LEADERSHIP_PANELS}
    named = set().union(*(names_in(e) for es in exprs.values() for e in es))
    assert named == {
        "queuekit_leader",
        "queuekit_leader_elections_total",
        "queuekit_leader_stepdowns_total",
        "queuekit_journal_connected",
        "queuekit_journal_open_failures_total",
    }
    a, b = 'job="ha",instance="a:8080"', 'job="ha",instance="b:8080"'
    series = {
        f"queuekit_leader{{{a}}}": "1x10",
        f"queuekit_leader{{{b}}}": "0x10",
        f"queuekit_journal_connected{{{a}}}": "1x10",
        f"queuekit_journal_connected{{{b}}}": "0x10",
        f"queuekit_leader_elections_total{{{a}}}": "0+1x10",  # one a minute: 5 in 5 minutes
        f"queuekit_leader_elections_total{{{b}}}": "0x10",
        f'queuekit_leader_stepdowns_total{{{a},reason="probe_failed"}}': "0+1x10",
        f'queuekit_leader_stepdowns_total{{{b},reason="probe_failed"}}': "0+1x10",
        f'queuekit_leader_stepdowns_total{{{a},reason="superseded"}}': "0x10",
        f"queuekit_journal_open_failures_total{{{b}}}": "0+2x10",
        f"queuekit_journal_open_failures_total{{{a}}}": "0x10",
        'queuekit_ready{job="single",instance="s:8080"}': "1x10",
    }
    expected = {
        "Role by server": [('{instance="a:8080"}', 1), ('{instance="b:8080"}', 0)],
        "Journal session by server": [('{instance="a:8080"}', 1), ('{instance="b:8080"}', 0)],
        "Elections and step-downs": [('{instance="a:8080"}', 5), ('{instance="b:8080"}', 0)],
        "Failed journal session opens": [('{instance="a:8080"}', 0), ('{instance="b:8080"}', 10)],
    }
    stepdowns = [('{reason="probe_failed"}', 10), ('{reason="superseded"}', 0)]
    checks = [
        {
            "expr": exprs[title][0],
            "eval_time": "10m",
            "exp_samples": [{"labels": labels, "value": value} for labels, value in samples],
        }
        for title, samples in expected.items()
    ]
    checks.append(
        {
            "expr": exprs["Elections and step-downs"][1],
            "eval_time": "10m",
            "exp_samples": [{"labels": labels, "value": value} for labels, value in stepdowns],
        }
    )
    case = {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "promql_expr_test": checks,
    }
    (tmp_path / "none.rules.yml").write_text("groups: []\n")
    (tmp_path / "panels.test.yml").write_text(json.dumps({"rule_files": ["none.rules.yml"], "tests": [case]}))
    tested = run("test", "rules", "panels.test.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr

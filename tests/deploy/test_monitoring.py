"""Prometheus configuration and alert rules (promtool), and the Grafana dashboard."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool
from tests.test_cli import get, wait_ready, write_config

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pacsflow.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=60, cwd=PROMETHEUS)


class TestPrometheus:
    def test_config_is_valid(self) -> None:
        result = promtool("check", "config", "prometheus.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rules_are_valid(self) -> None:
        result = promtool("check", "rules", "alerts.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rule_unit_tests_pass(self) -> None:
        result = promtool("test", "rules", "tests/alerts.test.yml")
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_alert_has_a_unit_test_or_is_listed_as_simple(self) -> None:
        rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
        alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
        tested = set(re.findall(r"alertname: (\w+)",
                                (PROMETHEUS / "tests" / "alerts.test.yml").read_text()))
        # Threshold-only rules whose expression is a single comparison.
        simple = {"PacsflowDestinationPaused", "PacsflowRouterStoreFailures", "PacsflowSyncFailing"}
        assert alerts - tested == simple


def dashboard_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dashboard", DASHBOARD.parents[1] / "dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestDashboard:
    def test_committed_json_is_what_the_script_writes(self) -> None:
        assert DASHBOARD.read_text() == dashboard_module().render(), \
            "run: python deploy/grafana/dashboard.py"

    def test_panels_do_not_overlap_and_have_queries(self) -> None:
        panels = json.loads(DASHBOARD.read_text())["panels"]
        cells = set()
        for item in panels:
            grid = item["gridPos"]
            for dx in range(grid["w"]):
                for dy in range(grid["h"]):
                    cell = (grid["x"] + dx, grid["y"] + dy)
                    assert cell not in cells, f"{item['title']} overlaps another panel"
                    cells.add(cell)
            if item["type"] != "row":
                assert item["targets"], item["title"]


def metric_names_in(expression: str) -> set[str]:
    names = set(re.findall(r"\b(pacsflow_[a-z_]+)", expression))
    # A histogram's series are <name>_bucket/_sum/_count; a counter's <name>_total.
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}


def dashboard_metrics() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {name for p in panels for t in p.get("targets", []) for name in metric_names_in(t["expr"])}


def alert_metrics() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {name for g in rules["groups"] for r in g["rules"] for name in metric_names_in(r["expr"])}


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The metric families of all six services, scraped from a running ``pacsflow run``."""
    tmp_path = tmp_path_factory.mktemp("monitoring")
    config, http_port = write_config(tmp_path)
    # Logs to a file: an unread pipe fills up and blocks the process.
    log = open(tmp_path / "pacsflow.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "pacsflow", "-c", str(config), "run"],
                               stderr=log, text=True)
    try:
        wait_ready(http_port, process)
        status, text = get(http_port, "/metrics")
        assert status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(name + "_total")
    return names


def test_dashboard_and_alerts_use_only_exported_metrics(exported_metrics: set[str]) -> None:
    used = dashboard_metrics() | alert_metrics()
    assert used, "no metric found in the dashboard"
    missing = sorted(used - exported_metrics)
    assert not missing, f"not exported by any service: {missing}"

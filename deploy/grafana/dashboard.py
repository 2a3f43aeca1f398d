"""Writes the provisioned Grafana dashboard: python deploy/grafana/dashboard.py

Every query uses metrics the services export; tests/deploy/test_monitoring.py checks that
against the live /metrics of running services and that the JSON here is up to date.
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).parent / "dashboards" / "pacsflow.json"
DATASOURCE = {"type": "prometheus", "uid": "pacsflow-prometheus"}

# (title, unit, [(query, legend)], panel type), in rows of three.
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    ("Overview", [
        ("Services running", "none",
         [("sum by (service) (pacsflow_service_up)", "{{service}}")], "stat"),
        ("Dead letters (1 h)", "none",
         [("sum by (service) (increase(pacsflow_bus_dead_letters_total[1h]))", "{{service}}")],
         "stat"),
        ("Events handled / s", "ops",
         [("sum by (service, outcome) (rate(pacsflow_bus_events_handled_total[5m]))",
           "{{service}} {{outcome}}")], "timeseries"),
    ]),
    ("Import folders and uploads", [
        ("Watcher: files / s by outcome", "ops",
         [("sum by (outcome) (rate(pacsflow_watcher_files_total[5m]))", "{{outcome}}"),
          ("sum(rate(pacsflow_watcher_files_archived_total[5m]))", "archived")], "timeseries"),
        ("Uploader: files / s by destination and status", "ops",
         [("sum by (destination, status) (rate(pacsflow_uploader_files_total[5m]))",
           "{{destination}} {{status}}")], "timeseries"),
        ("Uploader: bytes / s", "Bps",
         [("sum by (destination) (rate(pacsflow_uploader_bytes_total[5m]))",
           "{{destination}}")], "timeseries"),
        ("C-STORE latency (p50, p95)", "s",
         [("histogram_quantile(0.5, sum by (le, destination) "
           "(rate(pacsflow_uploader_store_seconds_bucket[5m])))", "p50 {{destination}}"),
          ("histogram_quantile(0.95, sum by (le, destination) "
           "(rate(pacsflow_uploader_store_seconds_bucket[5m])))", "p95 {{destination}}")],
         "timeseries"),
        ("Waiting deliveries and their age", "none",
         [("sum by (destination) (pacsflow_uploader_pending_files)", "pending {{destination}}"),
          ("max by (destination) (pacsflow_uploader_queue_lag_seconds)",
           "oldest (s) {{destination}}")], "timeseries"),
        ("Folders waiting for quiet", "none",
         [("sum(pacsflow_watcher_folders_pending)", "folders")], "timeseries"),
    ]),
    ("Router SCP", [
        ("Instances / s by route", "ops",
         [("sum by (route) (rate(pacsflow_router_instances_total[5m]))", "{{route}}")],
         "timeseries"),
        ("Received bytes / s", "Bps",
         [("sum by (route) (rate(pacsflow_router_received_bytes_total[5m]))", "{{route}}")],
         "timeseries"),
        ("Store latency (p95)", "s",
         [("histogram_quantile(0.95, sum by (le) (rate(pacsflow_router_store_seconds_bucket[5m])))",
           "p95")], "timeseries"),
        ("Associations by outcome", "ops",
         [("sum by (outcome, reason) (rate(pacsflow_router_associations_total[5m]))",
           "{{outcome}} {{reason}}")], "timeseries"),
        ("Studies open / completed per hour", "none",
         [("sum(pacsflow_router_studies_open)", "open"),
          ("sum(increase(pacsflow_router_studies_completed_total[1h]))", "completed (1 h)")],
         "timeseries"),
        ("Store failures", "none",
         [("sum by (route, reason) (increase(pacsflow_router_store_failures_total[1h]))",
           "{{route}} {{reason}}")], "timeseries"),
    ]),
    ("Harvest and sync", [
        ("Harvester: series by state", "none",
         [("sum by (state) (pacsflow_harvester_series)", "{{state}}")], "timeseries"),
        ("Harvester: requests per minute", "none",
         [("sum by (type) (rate(pacsflow_harvester_requests_total[2m])) * 60", "{{type}}")],
         "timeseries"),
        ("Harvester: instances / s", "ops",
         [("sum by (method) (rate(pacsflow_harvester_retrieved_instances_total[5m]))",
           "{{method}}")], "timeseries"),
        ("Sync: missing studies", "none",
         [("max(pacsflow_sync_missing_studies)", "missing")], "timeseries"),
        ("Sync: images per minute", "none",
         [("max(pacsflow_sync_images_per_minute)", "images / min")], "timeseries"),
        ("Sync: series moved by status", "none",
         [("sum by (status) (increase(pacsflow_sync_series_moved_total[1h]))", "{{status}}")],
         "timeseries"),
    ]),
    ("Notifications and bus", [
        ("Notifications pending / failing", "none",
         [("sum by (channel) (pacsflow_notifier_notifications_pending)", "pending {{channel}}"),
          ("sum by (channel) (pacsflow_notifier_notifications_failing)", "failing {{channel}}")],
         "timeseries"),
        ("Handler duration (p95)", "s",
         [("histogram_quantile(0.95, sum by (le, service) "
           "(rate(pacsflow_bus_handler_duration_seconds_bucket[5m])))", "{{service}}")],
         "timeseries"),
        ("Bus connection", "none",
         [("min by (instance) (pacsflow_bus_connected)", "{{instance}}")], "timeseries"),
    ]),
]


def panel(panel_id: int, x: int, y: int, title: str, unit: str,
          queries: list[tuple[str, str]], kind: str) -> dict[str, object]:
    return {
        "id": panel_id,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": 8, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": DATASOURCE, "expr": expr,
             "legendFormat": legend}
            for n, (expr, legend) in enumerate(queries)
        ],
    }


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    y, panel_id = 0, 1
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        panel_id, y = panel_id + 1, y + 1
        for index, (title, unit, queries, kind) in enumerate(row_panels):
            x = (index % 3) * 8
            if index and index % 3 == 0:
                y += 8
            panels.append(panel(panel_id, x, y, title, unit, queries, kind))
            panel_id += 1
        y += 8
    return {
        "uid": "pacsflow",
        "title": "pacsflow",
        "tags": ["pacsflow", "dicom"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": panels,
        "templating": {"list": []},
        "annotations": {"list": []},
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")

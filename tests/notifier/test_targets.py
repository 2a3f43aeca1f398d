"""A route's e-mail list comes from the routes file when the router uses one."""

from __future__ import annotations

import os
from pathlib import Path

from pacsflow.config import Settings

from pacsflow_notifier.targets import Targets


def _targets(tmp_path: Path, routes_file: Path) -> Targets:
    return Targets(Settings(
        state={"path": tmp_path / "state.db"},
        router={"routes_file": routes_file},
        notifier={"recipients": {"study-complete": ["archive@example.org"]}},
    ))  # fmt: skip


def _write(path: Path, text: str, stamp: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(stamp, stamp))  # a distinct modification time per version


def test_route_emails_follow_the_routes_file(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    _write(routes, f"CT_RESEARCH: {{path: {tmp_path}/ct, emails: [ct@example.org]}}\n", 1)
    targets = _targets(tmp_path, routes)
    assert targets.recipients("study-complete", "CT_RESEARCH") == [
        "ct@example.org", "archive@example.org"]

    _write(routes, f"CT_RESEARCH: {{path: {tmp_path}/ct, emails: [lab@example.org]}}\n"
                   f"MRI: {{path: {tmp_path}/mri, emails: [mri@example.org]}}\n", 2)
    assert targets.recipients("study-complete", "MRI") == ["mri@example.org", "archive@example.org"]
    assert targets.recipients("study-complete", "CT_RESEARCH")[0] == "lab@example.org"


def test_a_broken_routes_file_keeps_the_routes_read_before(tmp_path: Path, caplog) -> None:
    routes = tmp_path / "routes.yaml"
    _write(routes, f"CT: {{path: {tmp_path}/ct, emails: [ct@example.org]}}\n", 1)
    targets = _targets(tmp_path, routes)
    assert targets.recipients("study-complete", "CT")[0] == "ct@example.org"
    _write(routes, "CT: {path: [unclosed\n", 2)
    assert targets.recipients("study-complete", "CT")[0] == "ct@example.org"
    assert "keeping the routes read before" in caplog.text
    assert targets.recipients("study-complete", "UNKNOWN") == ["archive@example.org"]

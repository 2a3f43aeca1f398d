"""``pacsflow sync``: its options (the original tool's names among them) and ``--once``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pacsflow.cli import _sync_overrides, build_parser, main
from pacsflow.errors import ConfigError

from tests.peers import OrthancProcess, free_port

from .support import LOCAL_AE, SYNC_AE, CountingProxy, Scenario, local_series

Pair = tuple[OrthancProcess, OrthancProcess]


def overrides(*argv: str) -> dict[str, Any]:
    return _sync_overrides(build_parser().parse_args(["sync", *argv]))


class TestOptions:
    def test_min_images_is_max_images_mode(self) -> None:
        assert overrides("--min-images", "5") == {"selection": "max-images", "max_images": 5}
        assert overrides("--max-images", "5") == {"selection": "max-images", "max_images": 5}
        assert overrides("--min-images", "5", "--max-images", "5")["max_images"] == 5

    def test_all_series_is_all_mode(self) -> None:
        assert overrides("--all-series") == {"selection": "all"}
        assert overrides("--selection", "all", "--all-series") == {"selection": "all"}

    def test_own_names(self) -> None:
        assert overrides() == {}
        assert overrides(
            "--selection", "smallest", "--remote", "a", "--local", "B@h:104", "--interval", "30",
            "--window-hours", "6", "--days", "3", "--include-incomplete",
        ) == {
            "selection": "smallest", "remote": "a", "local": "B@h:104",
            "interval_seconds": 30.0, "window_hours": 6.0, "date_range_days": 3,
            "include_incomplete": True,
        }  # fmt: skip

    @pytest.mark.parametrize(
        "argv",
        [
            ["--min-images", "4", "--max-images", "5"],
            ["--all-series", "--min-images", "4"],
            ["--all-series", "--selection", "smallest"],
            ["--selection", "smallest", "--max-images", "3"],
        ],
    )
    def test_conflicting_options_are_refused(self, argv: list[str]) -> None:
        with pytest.raises(ConfigError):
            overrides(*argv)

    def test_bad_options_exit_2_with_the_reason(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"state": {"path": str(tmp_path / "s.db")}}))
        assert main(["-c", str(config), "sync", "--once", "--selection", "max-images"]) == 2
        assert "max_images" in capsys.readouterr().err
        assert main(["-c", str(config), "sync", "--once", "--remote", "nowhere",
                     "--local", "L@127.0.0.1:104"]) == 2  # fmt: skip
        assert "no node named 'nowhere'" in capsys.readouterr().err
        assert main(["-c", str(config), "sync", "--once"]) == 2
        assert "sync.remote and sync.local" in capsys.readouterr().err


def write_config(tmp_path: Path, remote: OrthancProcess, local_port: int) -> Path:
    config = {
        "state": {"path": str(tmp_path / "state.db")},
        "logging": {"format": "json", "level": "INFO"},
        "dicom": {"ae_title": SYNC_AE, "connect_timeout": 5, "dimse_timeout": 30},
        "nodes": {
            "router": {"ae_title": "PACSFLOW", "host": "127.0.0.1", "port": 11112},
            "remote": {"ae_title": remote.ae_title, "host": "127.0.0.1", "port": remote.dicom_port},
            "local": {"ae_title": LOCAL_AE, "host": "127.0.0.1", "port": local_port},
        },
        "sync": {"remote": "remote", "local": "local"},
    }
    path = tmp_path / "pacsflow.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pacsflow(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacsflow", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.mark.orthanc
class TestOnce:
    def test_original_flags_move_their_series_and_exit_0(
        self, pacs_pair: Pair, scenario: Scenario, move_proxy: CountingProxy, tmp_path: Path
    ) -> None:
        remote, local = pacs_pair
        config = str(write_config(tmp_path, remote, local.dicom_port))

        first = pacsflow("-c", config, "sync", "--once", "--min-images", "6")
        assert first.returncode == 0, first.stderr
        expected = {**scenario.series("recent", 3, 5), **scenario.series("earlier", 2)}
        assert local_series(local) == {**scenario.initially_local(), **expected}
        for label in ("remote studies", "missing studies", "series chosen", "transferred",
                      "images per minute"):  # fmt: skip
            assert label in first.stdout
        assert re.search(r"^  status +ok$", first.stdout, re.MULTILINE)

        # The studies are on the local PACS now: with --all-series only the series they lack
        # are copied, once --include-incomplete looks at them.
        second = pacsflow("-c", config, "sync", "--once", "--all-series", "--include-incomplete")
        assert second.returncode == 0, second.stderr
        assert len(local_series(local)) == 2 + 5
        assert move_proxy.connections == 5

    def test_local_pacs_down_exits_1_with_the_error(
        self, pacs_pair: Pair, move_proxy: CountingProxy, tmp_path: Path
    ) -> None:
        remote, _ = pacs_pair
        closed = free_port()
        result = pacsflow("-c", str(write_config(tmp_path, remote, closed)), "sync", "--once")
        assert result.returncode == 1
        assert f"error: the local PACS {LOCAL_AE}@127.0.0.1:{closed}" in result.stdout
        assert re.search(r"^  status +failed$", result.stdout, re.MULTILINE)
        assert '"level": "ERROR"' in result.stderr
        assert move_proxy.connections == 0

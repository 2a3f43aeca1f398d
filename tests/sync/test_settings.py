"""The sync section of the configuration: defaults, checks, and the example file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pacsflow.config import SyncSettings, load_settings
from pacsflow.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "pacsflow.example.yaml"


def load(tmp_path: Path, sync: dict[str, object]):  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sync": sync}))
    return load_settings(path)


class TestSyncSettings:
    def test_defaults_are_the_original_tools(self) -> None:
        sync = SyncSettings()
        assert (sync.interval_seconds, sync.date_range_days, sync.window_hours) == (60, 2, 12)
        assert sync.selection == "smallest" and sync.max_images is None
        assert not sync.include_incomplete

    def test_max_images_mode_needs_its_limit(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="sync: Value error, selection max-images"):
            load(tmp_path, {"selection": "max-images"})
        assert load(tmp_path, {"selection": "max-images", "max_images": 4}).sync.max_images == 4

    @pytest.mark.parametrize(
        ("sync", "key"),
        [
            ({"timezone": "Mars/Olympus"}, "sync.timezone"),
            ({"window_hours": 0}, "sync.window_hours"),
            ({"date_range_days": 0}, "sync.date_range_days"),
            ({"selection": "largest"}, "sync.selection"),
            ({"untimed_studies": "guess"}, "sync.untimed_studies"),
            ({"movers": 0}, "sync.movers"),
            ({"destination_ae": "A" * 17}, "sync.destination_ae"),
            ({"retry_initial_seconds": 10, "retry_max_seconds": 5}, "sync"),
            ({"min_images": 5}, "sync.min_images"),
        ],
    )
    def test_bad_values_name_their_key(
        self, tmp_path: Path, sync: dict[str, object], key: str
    ) -> None:
        with pytest.raises(ConfigError, match=f"  {key}: "):
            load(tmp_path, sync)

    def test_window_can_be_switched_off(self, tmp_path: Path) -> None:
        assert load(tmp_path, {"window_hours": None}).sync.window_hours is None

    def test_example_file_documents_every_key(self) -> None:
        lines = EXAMPLE.read_text().splitlines()
        documented = set()
        for line in lines[lines.index(next(x for x in lines if x.startswith("sync:"))) + 1 :]:
            if line and not line.startswith((" ", "#")):
                break  # the next section
            documented.add(line.strip().lstrip("# ").split(":")[0])
        assert set(SyncSettings.model_fields) <= documented
        assert load_settings(EXAMPLE).sync == SyncSettings()

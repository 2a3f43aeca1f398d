"""The notifier's settings: secrets from the environment, and the errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pacsflow.config import load_settings
from pacsflow.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacsflow.yaml"
    path.write_text(text)
    return path


class TestNotifierSettings:
    def test_webhook_url_comes_from_the_environment_and_stays_secret(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PACSFLOW_NOTIFIER__WEBHOOKS__TEAMS__URL", "https://hooks.example/T0KEN")
        settings = load_settings(
            write(tmp_path, "notifier:\n  webhooks:\n    teams:\n      kinds: [file-failed]\n")
        )
        hook = settings.notifier.webhooks["teams"]
        assert hook.url.get_secret_value() == "https://hooks.example/T0KEN"
        assert hook.kinds == ["file-failed"]
        assert "T0KEN" not in repr(settings)

    @pytest.mark.parametrize(
        ("yaml", "key"),
        [
            ("notifier:\n  smtp:\n    starttls: true\n    tls: true\n", "notifier.smtp"),
            ('notifier:\n  recipients:\n    study-complete: ["a@b.example\\nBcc: c@d.example"]\n',
             "notifier.recipients.study-complete.0"),
            ("notifier:\n  recipients:\n    study-complete: ['a@b.example, c@d.example']\n",
             "notifier.recipients.study-complete.0"),
            ("notifier:\n  recipients:\n    study-complete: [nobody]\n",
             "notifier.recipients.study-complete.0"),
            ("notifier:\n  recipients:\n    study-done: [a@b.example]\n",
             "notifier.recipients.study-done.[key]"),
            ("notifier:\n  timezone: Mars/Olympus\n", "notifier.timezone"),
            ("notifier:\n  webhooks:\n    x:\n      url: ftp://h/\n", "notifier.webhooks.x.url"),
            ("notifier:\n  retry_initial_seconds: 60\n  retry_max_seconds: 10\n", "notifier"),
            ('notifier:\n  smtp:\n    sender: "x@h.example\\r\\nBcc: y@h.example"\n',
             "notifier.smtp.sender"),
        ],
    )
    def test_bad_value_names_the_key(self, tmp_path: Path, yaml: str, key: str) -> None:
        with pytest.raises(ConfigError, match=f"  {re.escape(key)}: "):
            load_settings(write(tmp_path, yaml))

    @pytest.mark.parametrize(
        "address", ["a@b.example", "Dr. Who <who@hospital.example>", '"Who, Dr." <w@h.example>']
    )
    def test_good_addresses(self, address: str) -> None:
        settings = load_settings(None, notifier={"recipients": {"file-failed": [address]}})
        assert settings.notifier.recipients["file-failed"] == [address]

"""Configuration: one YAML file plus ``PACSFLOW_``-prefixed environment overrides.

Environment variables win over the file; nested keys use ``__`` (``PACSFLOW_BUS__URL``).
Secrets (passwords) come from the environment or from files in a secrets folder, never from
the YAML kept in a repository. Every error names the file and the dotted key that is wrong.
"""

from __future__ import annotations

import os
import re
import socket
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from pacsflow.errors import ConfigError

__all__ = ["Settings", "Node", "load_settings", "parse_node", "AETitle", "SERVICES"]

#: every service the ``pacsflow`` command can run
SERVICES = ("watcher", "uploader", "harvester", "sync", "router-scp", "notifier")

_AE_TITLE_CHARS = re.compile(r"^[\x20-\x7e]+$")


def _check_ae_title(value: str) -> str:
    # PS3.5 8.5: at most 16 characters of the default repertoire, no backslash, not all spaces.
    stripped = value.strip()
    if not stripped:
        raise ValueError("AE title must not be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"AE title {value!r} is longer than 16 characters")
    if not _AE_TITLE_CHARS.match(value) or "\\" in value:
        raise ValueError(f"AE title {value!r} has a character DICOM does not allow")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """DICOM TLS (PS3.15 Annex B): certificates for one side of an association."""

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    # An SCP that requires a client certificate signed by ca_file.
    require_client_cert: bool = True


class Node(_Section):
    """A DICOM node: an AE title at a host and port."""

    ae_title: AETitle
    host: str
    port: Port
    tls: TlsSettings = TlsSettings()

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_node(text: str) -> Node:
    """Parse ``AET@HOST:PORT`` (the form the command line takes)."""
    match = re.match(r"^([^@]+)@(.+):(\d+)$", text)
    if not match:
        raise ConfigError(f"{text!r} is not of the form AET@HOST:PORT")
    try:
        return Node(ae_title=match[1], host=match[2], port=int(match[3]))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source=repr(text))) from err


class DicomSettings(_Section):
    """Defaults for every association pacsflow makes or accepts."""

    ae_title: AETitle = "PACSFLOW"
    # 0 means no limit; pynetdicom's default of 16382 bytes costs time on large images.
    max_pdu: int = Field(default=262144, ge=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    tls: TlsSettings = TlsSettings()


class BusSettings(_Section):
    backend: Literal["embedded", "rabbitmq"] = "embedded"
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = "pacsflow.events"
    # Namespace of the queues, so two installations can share one broker.
    queue_prefix: str = "pacsflow"
    prefetch: int = Field(default=16, ge=1)
    # A message whose handler fails this many times goes to the dead letters.
    delivery_limit: int = Field(default=5, ge=1)


class StateSettings(_Section):
    backend: Literal["sqlite", "postgres"] = "sqlite"
    # The SQLite file; in embedded mode it also keeps the bus messages.
    path: Path = Path("data/pacsflow.db")
    dsn: SecretStr = SecretStr("postgresql://pacsflow@127.0.0.1:5432/pacsflow")
    pool_size: int = Field(default=10, ge=1)


class HttpSettings(_Section):
    host: str = "0.0.0.0"
    # /metrics, /healthz and /readyz; 0 picks a free port (tests).
    port: int = Field(default=9400, ge=0, le=65535)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class WatcherSettings(_Section):
    import_folders: list[Path] = [Path("data/inbox")]
    quarantine_folder: Path = Path("data/quarantine")
    archive_folder: Path = Path("data/archive")
    # A folder is handled after it has been this long without changes.
    debounce_seconds: float = Field(default=180.0, ge=0)
    # Files per file-ready event.
    batch_size: int = Field(default=200, ge=1)
    # Sets PatientID (group 1) and PatientName (group 2) from the import folder's name,
    # e.g. '^#([0-9]+)-([#^A-Za-z0-9]+)$' for '#12345-HongGildong'. None: no rewrite.
    rename_pattern: str | None = None
    # What to do with a folder whose name does not match rename_pattern.
    unmatched_folders: Literal["leave", "quarantine"] = "leave"
    # Node names for the uploader; empty: the uploader's own destinations.
    destinations: list[str] = []
    # How often confirmed files are looked for to archive, besides on every file-sent event.
    archive_interval_seconds: float = Field(default=30.0, gt=0)

    @field_validator("rename_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                compiled = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from err
            if compiled.groups < 2:
                raise ValueError("needs two groups: PatientID and PatientName")
        return pattern


class UploaderSettings(_Section):
    # Names of entries in ``nodes``.
    destinations: list[str] = ["router"]
    associations: int = Field(default=0, ge=0)  # 0: sized to the machine
    max_attempts: int = Field(default=5, ge=1)
    max_load_per_core: float = Field(default=4.0, gt=0)


class Route(_Section):
    path: Path
    emails: list[str] = []
    forward: list[str] = []
    allowed_calling_aes: list[str] = []
    allowed_addresses: list[str] = []


class RouterSettings(_Section):
    ae_title: AETitle = "PACSFLOW"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    routes_file: Path | None = None
    routes: dict[str, Route] = {"PACSFLOW": Route(path=Path("data/storage"))}
    study_quiet_seconds: float = Field(default=60.0, ge=0)
    max_associations: int = Field(default=32, ge=1)


#: the kinds of message the notifier sends; ``recipients``, ``templates`` and webhooks use them
NotificationKind = Literal["study-complete", "patient-complete", "file-failed", "dead-letters"]
NOTIFICATION_KINDS: tuple[str, ...] = get_args(NotificationKind)


def check_email_address(value: str) -> str:
    """The address, stripped; ValueError unless it is one address without control characters
    (it goes into mail headers and the SMTP envelope)."""
    value = value.strip()
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"e-mail address {value!r} contains a control character")
    _, address = parseaddr(value)
    if not address or "@" not in address or address.startswith("@") or address.endswith("@"):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


EmailAddress = Annotated[str, AfterValidator(check_email_address)]


class SmtpSettings(_Section):
    """The mail server; without a host, mails are written to ``notifier.mail_folder``."""

    host: str | None = None
    port: Port = 25
    # STARTTLS after connecting (usually port 587), or TLS from the start (SMTPS, port 465).
    starttls: bool = False
    tls: bool = False
    # Certificate authorities to verify the server with (default: the system's).
    ca_file: Path | None = None
    username: str | None = None
    # From PACSFLOW_NOTIFIER__SMTP__PASSWORD, the secrets folder, or password_file.
    password: SecretStr | None = None
    # A file holding the password (a mounted container secret); read at each connection.
    password_file: Path | None = None
    sender: EmailAddress = "pacsflow@localhost"
    timeout: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check_security(self) -> SmtpSettings:
        if self.starttls and self.tls:
            raise ValueError("starttls and tls exclude each other: choose one")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file exclude each other: choose one")
        return self


class MessageTemplate(_Section):
    """Templates of one kind of message: ``${name}`` placeholders; unset parts keep the
    built-in text. Values are cleaned of line breaks (and HTML-escaped in ``html``)."""

    subject: str | None = None
    text: str | None = None
    # Adds an HTML part next to the plain text.
    html: str | None = None


class WebhookSettings(_Section):
    """A JSON POST per message (Teams, Slack or Mattermost incoming webhooks, or your own)."""

    # Webhook URLs carry their token: PACSFLOW_NOTIFIER__WEBHOOKS__<NAME>__URL.
    url: SecretStr
    kinds: list[NotificationKind] = list(NOTIFICATION_KINDS)
    # chat: {"text": ...} as chat webhooks expect; json: subject, text and the facts.
    format: Literal["chat", "json"] = "chat"
    timeout: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("http://", "https://")):
            raise ValueError("a webhook URL starts with http:// or https://")
        return value


class NotifierSettings(_Section):
    smtp: SmtpSettings = SmtpSettings()
    # Where mails go as files when no SMTP host is set.
    mail_folder: Path = Path("data/mail")
    # Who gets each kind of message; study-complete also goes to its route's emails.
    recipients: dict[NotificationKind, list[EmailAddress]] = {}
    templates: dict[NotificationKind, MessageTemplate] = {}
    webhooks: dict[str, WebhookSettings] = {}
    # Times in messages are shown in this zone (IANA name); default: the machine's.
    timezone: str | None = None
    # Failed files and dead letters are gathered this long after the first one, then
    # reported in one message: at most one alert of each kind per window.
    alert_window_seconds: float = Field(default=300.0, gt=0)
    dead_letter_check_seconds: float = Field(default=60.0, gt=0)
    # A message that cannot be delivered is retried after retry_initial_seconds, doubling up
    # to retry_max_seconds, for ever; from failing_after_attempts on it counts as failing.
    retry_initial_seconds: float = Field(default=10.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    failing_after_attempts: int = Field(default=6, ge=1)
    # How often to look for due messages that no wake-up announced (other processes).
    poll_seconds: float = Field(default=5.0, gt=0)
    # Sent messages and reported failures are kept this long (their redeliveries stay no-ops).
    retention_days: float = Field(default=30.0, gt=0)

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as err:
                raise ValueError(f"unknown time zone {value!r}") from err
        return value

    @model_validator(mode="after")
    def _check_retry(self) -> NotifierSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is shorter than retry_initial_seconds")
        return self


class HarvesterSettings(_Section):
    source: str | None = None
    destination_ae: AETitle | None = None
    requests_per_minute: int = Field(default=700, ge=1)
    workers: int = Field(default=2, ge=1)
    archive_folder: Path = Path("data/harvest")


class SyncSettings(_Section):
    remote: str | None = None
    local: str | None = None
    interval_seconds: float = Field(default=60.0, gt=0)
    window_hours: float = Field(default=12.0, gt=0)
    selection: Literal["smallest", "max-images", "all"] = "smallest"
    max_images: int | None = Field(default=None, ge=1)


def _default_instance() -> str:
    return socket.gethostname()


class Settings(BaseSettings):
    """The whole configuration of one pacsflow process."""

    model_config = SettingsConfigDict(
        env_prefix="PACSFLOW_",
        env_nested_delimiter="__",
        # Secret files are named like the variables: pacsflow_notifier__smtp__password.
        secrets_nested_delimiter="__",
        secrets_dir_missing="ok",
        extra="forbid",
        case_sensitive=False,
    )

    # Names this process in event sources and logs (a host, pod or container name).
    instance: str = Field(default_factory=_default_instance)
    bus: BusSettings = BusSettings()
    state: StateSettings = StateSettings()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()
    dicom: DicomSettings = DicomSettings()
    nodes: dict[str, Node] = {
        "router": Node(ae_title="PACSFLOW", host="127.0.0.1", port=11112),
    }
    watcher: WatcherSettings = WatcherSettings()
    uploader: UploaderSettings = UploaderSettings()
    router: RouterSettings = RouterSettings()
    notifier: NotifierSettings = NotifierSettings()
    harvester: HarvesterSettings = HarvesterSettings()
    sync: SyncSettings = SyncSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the YAML file (passed as init values); secret files last.
        return env_settings, init_settings, NestedSecretsSettingsSource(file_secret_settings)

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        for section, names in (("uploader", self.uploader.destinations),
                               ("watcher", self.watcher.destinations)):
            for name in names:
                if name not in self.nodes:
                    raise ValueError(f"{section}.destinations names {name!r}, which is not in nodes")
        return self

    def node(self, name_or_address: str) -> Node:
        """A configured node by name, or a node given as ``AET@HOST:PORT``."""
        if name_or_address in self.nodes:
            return self.nodes[name_or_address]
        if "@" in name_or_address:
            return parse_node(name_or_address)
        raise ConfigError(f"no node named {name_or_address!r} (known: {', '.join(self.nodes)})")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load the YAML file at ``path`` (or only defaults and environment when None)."""
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{source}: cannot read: {err.strerror}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys")
        data = loaded
    data.update(overrides)
    secrets_dir = os.environ.get("PACSFLOW_SECRETS_DIR")
    try:
        if secrets_dir and Path(secrets_dir).is_dir():
            return Settings(_secrets_dir=secrets_dir, **data)  # type: ignore[call-arg]
        return Settings(**data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from err

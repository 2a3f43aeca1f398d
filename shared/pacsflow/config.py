"""Configuration: one YAML file plus ``PACSFLOW_``-prefixed environment overrides.

Environment variables win over the file; nested keys use ``__`` (``PACSFLOW_BUS__URL``).
Secrets (passwords) come from the environment or from files in a secrets folder, never from
the YAML kept in a repository. Every error names the file and the dotted key that is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from email.utils import getaddresses
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


def _check_timezone(value: str | None) -> str | None:
    if value is not None:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown time zone {value!r}") from err
    return value


#: an IANA time zone name (Europe/Berlin, Asia/Seoul); None: the machine's
TimeZone = Annotated[str | None, AfterValidator(_check_timezone)]


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
    # C-STOREs the uploader may have outstanding on one association (asynchronous operations,
    # PS3.7 D.3.3.3). Above 1 only for a peer known to support them, such as pacsflow's own
    # router-scp: some PACS drop the connection when they are proposed. Peers that do not
    # answer the proposal get one at a time.
    operations_window: int = Field(default=1, ge=1, le=256)

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
    # The C-STORE/C-ECHO engine of the router's SCP and the uploader's senders: asyncio (one
    # event loop, no thread hand-offs) or lean (blocking sockets, a thread per association).
    # Unset: each its fastest (router asyncio, uploader uploader.engine); set, it also picks
    # the uploader's unless uploader.engine is set. C-FIND/C-MOVE/C-GET always use pynetdicom.
    engine: Literal["asyncio", "lean"] | None = None


class BusSettings(_Section):
    backend: Literal["embedded", "rabbitmq"] = "embedded"
    url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    exchange: str = "pacsflow.events"
    # Namespace of the queues, so two installations can share one broker.
    queue_prefix: str = "pacsflow"
    prefetch: int = Field(default=16, ge=1)
    # A message whose handler fails this many times goes to the dead letters.
    delivery_limit: int = Field(default=5, ge=1)
    # A handler still running after this long is cancelled and its event retried; it must stay
    # well under RabbitMQ's consumer timeout (30 min), so long work is driven from the state store.
    handler_timeout: float = Field(default=600.0, gt=0, le=1500)
    # How long a publish may wait for the broker (through a restart) before it fails.
    publish_timeout: float = Field(default=60.0, gt=0)
    # Services whose queues every process declares at start, so events published before a
    # service first runs are kept for it. Leave out a service this installation never runs.
    declare_services: list[str] = list(SERVICES)

    @field_validator("declare_services")
    @classmethod
    def _known_services(cls, names: list[str]) -> list[str]:
        unknown = [name for name in names if name not in SERVICES]
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; known: {', '.join(SERVICES)}")
        return names


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
    # Folder names matching this pattern carry a patient's name in its second group (as
    # '#12345-HongGildong' does): above DEBUG, log lines show it as '***'. Unset: the
    # watcher's rename_pattern.
    redact_folder_pattern: str | None = None

    @field_validator("redact_folder_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                if re.compile(pattern).groups < 2:
                    raise ValueError("needs two groups: PatientID and PatientName")
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from err
        return pattern


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
    """How the uploader sends: concurrency, retries, back-pressure."""

    # Names of entries in ``nodes``; file-ready events that name none go to these.
    destinations: list[str] = ["router"]
    # Associations per destination, each kept open from batch to batch; 0: sized to the
    # machine (two per core, 2 to 8). A PACS that takes fewer is detected and respected.
    associations: int = Field(default=0, ge=0, le=64)
    # Sender processes shared by every destination's associations; None: one per core (at
    # most one per association); 0: threads of the service's own process.
    processes: int | None = Field(default=None, ge=0, le=64)
    # lean: pacsflow's own C-STORE path on blocking sockets (fast); asyncio: the asyncio
    # engine's (dicom.engine); pynetdicom: the shared pynetdicom sender.
    engine: Literal["lean", "pynetdicom", "asyncio"] = "lean"
    # Files per task handed to one association (the in-flight window per association).
    chunk_size: int = Field(default=32, ge=1, le=1000)
    # Attempts per file and destination that got an answer (failure status, no response);
    # then the delivery fails and file-failed is emitted. An unreachable destination uses no
    # attempts: its files wait (see retry_*).
    max_attempts: int = Field(default=5, ge=1)
    # Wait before the next attempt (and before calling a failing destination again), doubling
    # per failure up to retry_max_seconds.
    retry_initial_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    # Pause taking new work while the 1-minute load average per core is above this.
    max_load_per_core: float = Field(default=4.0, gt=0)
    # Associations idle this long are released (a PACS may drop idle ones itself).
    idle_release_seconds: float = Field(default=20.0, gt=0)
    # A delivery claimed by an uploader that stopped renewing its claim this long ago is
    # taken over (another host's crash); claims of this host's dead processes at once.
    claim_timeout_seconds: float = Field(default=600.0, gt=0)
    # Before sending again a file whose earlier send got no answer (a crash, a lost
    # association), ask the destination with C-FIND (IMAGE level) whether it has it.
    verify_in_doubt: bool = False

    @model_validator(mode="after")
    def _check_retry(self) -> UploaderSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is shorter than retry_initial_seconds")
        return self


def _address_list(value: Any) -> Any:
    # The seed's route files kept e-mails as one string: "a@b.org, c@d.org" or "a@b.org; c@d.org".
    if isinstance(value, str):
        return [part.strip() for part in re.split(r"[,;]", value) if part.strip()]
    return value


class Route(_Section):
    """Where the images sent to one called AE title go, and who hears about them.

    Besides the mapping below, a route may be written as just its path (``MRI: /data/mri``)
    or as ``[path, emails]``, and ``email``/``mail`` are read as ``emails`` (a list or one
    comma-separated string): the shapes of older route files.
    """

    path: Path
    emails: list[str] = []
    # Node names (``nodes``): every received file is announced to the uploader for them.
    forward: list[str] = []
    # When set, only these calling AE titles / addresses (IPs or CIDR networks) may send.
    allowed_calling_aes: list[str] = []
    allowed_addresses: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _older_shapes(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            value = {"path": value}
        elif isinstance(value, (list, tuple)):
            if not 1 <= len(value) <= 2:
                raise ValueError("a route written as a list is [path] or [path, emails]")
            value = {"path": value[0], **({"emails": value[1]} if len(value) == 2 else {})}
        if isinstance(value, dict):
            value = dict(value)
            for alias in ("email", "mail", "mails"):
                if alias in value:
                    if "emails" in value:
                        raise ValueError(f"both emails and {alias} are given: use emails")
                    value["emails"] = value.pop(alias)
            if "emails" in value:
                value["emails"] = _address_list(value["emails"])
        return value

    @field_validator("allowed_addresses")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        for address in values:
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError as err:
                raise ValueError(f"{address!r} is not an IP address or network") from err
        return values

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_titles(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(value) for value in values]


class RouterSettings(_Section):
    ae_title: AETitle = "PACSFLOW"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    # A YAML or JSON file of routes (called AE title -> route); when set, it replaces
    # ``routes`` and is reloaded on SIGHUP and whenever it changes.
    routes_file: Path | None = None
    routes: dict[AETitle, Route] = {"PACSFLOW": Route(path=Path("data/storage"))}
    # Checked for every route, before the route's own lists.
    allowed_calling_aes: list[AETitle] = []
    allowed_addresses: list[str] = []
    # A study is complete after this long without a new instance.
    study_quiet_seconds: float = Field(default=60.0, ge=0)
    max_associations: int = Field(default=32, ge=1)
    # Receiving processes; more than 1 starts that many worker processes sharing the port.
    # 0: one per CPU core.
    processes: int = Field(default=1, ge=0, le=64)
    # The largest PDU accepted (announced to senders); a larger one aborts the association.
    max_pdu: int = Field(default=262144, ge=4096, le=1 << 26)
    # Limits for slow or idle senders: the association request, the wait for the next PDU,
    # and one PDU once it has begun.
    request_timeout_seconds: float = Field(default=10.0, gt=0)
    idle_timeout_seconds: float = Field(default=60.0, gt=0)
    pdu_timeout_seconds: float = Field(default=30.0, gt=0)
    # A larger data set is refused (0xA700) instead of held in memory.
    max_instance_bytes: int = Field(default=2 << 30, ge=1 << 20)
    # C-STOREs a sender may have outstanding on one association when it proposes
    # asynchronous operations (PS3.7 D.3.3.3); answered in order, several in one write. 1
    # declines the proposal. The asyncio engine only.
    operations_window: int = Field(default=16, ge=1, le=256)
    # fsync every file (and its folder) before answering: survives a power cut, costs time.
    fsync: bool = False
    # Study updates go to the state store in batches this often (and at shutdown).
    flush_seconds: float = Field(default=0.5, gt=0)
    # How often quiet studies are looked for.
    sweep_seconds: float = Field(default=2.0, gt=0)
    # A completion claimed but not confirmed published after this long is published again
    # (same event id) by any router process: the claimer crashed.
    claim_timeout_seconds: float = Field(default=60.0, gt=0)
    # How often the routes file's modification time is checked.
    routes_poll_seconds: float = Field(default=2.0, gt=0)
    # Files per file-ready event of forward routes.
    forward_batch_size: int = Field(default=200, ge=1)
    # Completed studies are forgotten after this long (their files stay).
    retention_days: float = Field(default=30.0, gt=0)
    # Abstract syntaxes accepted besides the standard storage SOP classes (private ones).
    extra_sop_classes: list[str] = []

    @field_validator("allowed_addresses")
    @classmethod
    def _check_networks(cls, values: list[str]) -> list[str]:
        return Route._check_networks(values)


#: the kinds of message the notifier sends; ``recipients``, ``templates`` and webhooks use them
NotificationKind = Literal["study-complete", "patient-complete", "file-failed", "dead-letters"]
NOTIFICATION_KINDS: tuple[str, ...] = get_args(NotificationKind)

# local@domain without spaces or the characters that separate or quote addresses
_MAILBOX = re.compile(r'^[^@\s<>()\[\],;:\\"]+@[^@\s<>()\[\],;:\\"]+$')


def check_email_address(value: str) -> str:
    """The address, stripped; ValueError unless it is one address without control characters
    (it goes into mail headers and the SMTP envelope)."""
    value = value.strip()
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError(f"e-mail address {value!r} contains a control character")
    found = getaddresses([value])
    if len(found) != 1 or not _MAILBOX.match(found[0][1]):
        raise ValueError(f"{value!r} is not one e-mail address")
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
    timezone: TimeZone = None
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

    @model_validator(mode="after")
    def _check_retry(self) -> NotifierSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is shorter than retry_initial_seconds")
        return self


_DICOM_DATE_RANGE = re.compile(r"^(\d{8})?-?(\d{8})?$")
_CLOCK_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)\s*-\s*([01]\d|2[0-3]|24):([0-5]\d)$")


def _check_date_range(value: str) -> str:
    # DICOM range matching (PS3.4 C.2.2.2.5): a date, "from-", "-to" or "from-to".
    value = value.strip()
    match = _DICOM_DATE_RANGE.match(value)
    if not value or value == "-" or not match or (match[1] and match[2] and "-" not in value):
        raise ValueError(f"{value!r} is not a date range: YYYYMMDD, YYYYMMDD-, -YYYYMMDD or "
                         "YYYYMMDD-YYYYMMDD")
    if match[1] and match[2] and match[1] > match[2]:
        raise ValueError(f"date range {value!r} ends before it starts")
    return value


def _check_clock_window(value: str) -> str:
    match = _CLOCK_WINDOW.match(value.strip())
    if not match or (match[3] == "24" and match[4] != "00"):
        raise ValueError(f"{value!r} is not a daily window HH:MM-HH:MM (e.g. 02:55-03:10)")
    if (match[1], match[2]) == (match[3], match[4]):
        raise ValueError(f"window {value!r} starts and ends at the same time")
    return value.strip()


DateRange = Annotated[str, AfterValidator(_check_date_range)]
ClockWindow = Annotated[str, AfterValidator(_check_clock_window)]


class HarvestCriteria(_Section):
    """Which patients, studies and series the harvester pulls.

    Patients come from ``patient_ids`` / ``patient_ids_file`` when given (no patient query),
    otherwise from a C-FIND (``discovery``). Every other criterion filters what is found; the
    PACS is asked to narrow the answers where DICOM matching allows it, and every answer is
    checked again here.
    """

    # An explicit cohort: these PatientIDs, and those in the file (one per line, # comments).
    patient_ids: list[str] = []
    patient_ids_file: Path | None = None
    # Only PatientIDs this regular expression matches entirely.
    patient_id_pattern: str | None = None
    # How patients are found without an explicit cohort: a PATIENT-level C-FIND (Patient
    # Root), or STUDY-level C-FINDs by study date (for a PACS without patient queries).
    discovery: Literal["patient", "study"] = "patient"
    # The PatientID sent in discovery queries (DICOM wildcards * and ?).
    patient_query: str = "*"
    # Study dates: DICOM ranges, any of them matching (YYYYMMDD, YYYYMMDD-, -YYYYMMDD, A-B).
    study_dates: list[DateRange] = []
    # Modalities of the series to pull (a study is pulled when it has any of them).
    modalities: list[str] = []
    # "module:function" called as function(level, attributes) -> bool for each PATIENT,
    # STUDY and SERIES found; False leaves it out.
    plugin: str | None = None
    # Without any criterion every patient of the PACS would be pulled: say so explicitly.
    select_all: bool = False

    @field_validator("patient_id_pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from err
        return pattern

    @field_validator("plugin")
    @classmethod
    def _plugin_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w]+$", value):
            raise ValueError(f"{value!r} is not module:function")
        return value

    @field_validator("modalities")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [value.strip().upper() for value in values if value.strip()]

    @property
    def explicit_cohort(self) -> bool:
        """True when the patients are listed rather than found by a query."""
        return bool(self.patient_ids or self.patient_ids_file)

    @property
    def selects_something(self) -> bool:
        """True unless no criterion at all narrows the harvest."""
        return bool(
            self.explicit_cohort or self.patient_id_pattern or self.study_dates
            or self.modalities or self.plugin or self.patient_query not in ("*", "")
        )  # fmt: skip


class HarvesterSettings(_Section):
    """The harvester: which PACS, what to pull, how (C-MOVE or C-GET), how fast and when."""

    # Node name (``nodes``) of the PACS to harvest; unset: the harvester waits idle.
    source: str | None = None
    # move: C-MOVE to destination_ae (the PACS must know that AE); get: C-GET, the
    # harvester receives and files the instances itself (no separate SCP needed).
    method: Literal["move", "get"] = "move"
    # C-MOVE destination; default: the router's AE title (router.ae_title).
    destination_ae: AETitle | None = None
    # Where instances land, in the router's layout
    # (<PatientID>/<StudyDate>_<StudyTime>/<SeriesUID>/<SOPUID>.dcm); it is how arrivals are
    # checked. Default: the path of the router route named by destination_ae (C-GET: by
    # router.ae_title).
    storage_path: Path | None = None
    # Query/Retrieve information model for studies, series and images.
    query_model: Literal["study", "patient"] = "study"
    # lean: the harvester's own C-FIND/C-MOVE (little CPU per response, which matters with
    # one response per image); pynetdicom: the shared DICOM module. C-GET always uses the latter.
    engine: Literal["lean", "pynetdicom"] = "lean"
    criteria: HarvestCriteria = HarvestCriteria()
    # DIMSE requests (C-FIND, C-MOVE, C-GET) per minute, shared by every worker and every
    # harvester process using the same state store.
    requests_per_minute: int = Field(default=700, ge=1, le=60000)
    # How much later than planned a request may reach the PACS (thread and association
    # start-up); the pacing leaves this much room so the PACS never counts more than
    # requests_per_minute in any minute.
    rate_margin_seconds: float = Field(default=1.0, ge=0, le=30)
    # Series retrieved at once by this process.
    workers: int = Field(default=2, ge=1, le=32)
    # A series (or a query) failing this many times is marked failed and reported.
    max_attempts: int = Field(default=5, ge=1, le=100)
    # Wait before the next attempt, doubling per failure up to retry_max_seconds; the same
    # backoff pauses every request while the PACS cannot be reached at all (that uses no
    # attempts: it is not the series' fault).
    retry_initial_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=1800.0, gt=0)
    # After a retrieve, missing instances are requested again (IMAGE level, only those)
    # up to this many times before the attempt counts as failed.
    refetch_rounds: int = Field(default=2, ge=0, le=20)
    # SOP Instance UIDs per IMAGE-level re-fetch request.
    refetch_batch: int = Field(default=200, ge=1, le=5000)
    # The IMAGE-level C-FIND that checks a retrieve runs during the retrieve, on a second
    # association; false for a PACS that allows one association per AE (with workers: 1).
    list_while_retrieving: bool = True
    # A claimed series (or query) whose harvester stops renewing its claim this long is
    # taken over by another; a crashed harvester's claims on this host return at its restart.
    lease_seconds: float = Field(default=120.0, ge=5)
    # Daily windows (local time of ``timezone``) in which no new request starts, e.g. the
    # known reset of a link: ["02:55-03:10"]. A window may cross midnight.
    pause_windows: list[ClockWindow] = []
    # When set, requests start only inside these daily windows (e.g. ["20:00-06:00"]).
    work_windows: list[ClockWindow] = []
    # IANA zone of the windows; default: the machine's.
    timezone: TimeZone = None
    # Each complete patient becomes <archive_folder>/<PatientID>.zip (rebuilt when a series
    # is added later); false: no archives, patient-complete is still emitted.
    archive: bool = True
    archive_folder: Path = Path("data/harvest")
    archive_compression: Literal["stored", "deflated"] = "stored"
    # Query the PACS again for new studies and series this often; unset: once.
    rescan_hours: float | None = Field(default=None, gt=0)
    # How often idle workers look for work that other processes queued.
    poll_seconds: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _check_retry(self) -> HarvesterSettings:
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is shorter than retry_initial_seconds")
        if self.source and not (self.criteria.selects_something or self.criteria.select_all):
            raise ValueError(
                "criteria select every patient of the PACS: set criteria, or "
                "criteria.select_all: true if that is meant"
            )
        return self


class SyncSettings(_Section):
    """What the sync service compares, how it chooses series, and how it retries."""

    # Node names (or AET@HOST:PORT): the PACS studies are copied from and the one kept up to
    # date. The remote must know the local PACS's AE title as a C-MOVE destination.
    remote: str | None = None
    local: str | None = None
    # The AE title the remote C-MOVEs to; default: the local node's AE title.
    destination_ae: AETitle | None = None
    # A cycle starts this long after the previous one started (at once if that took longer).
    interval_seconds: float = Field(default=60.0, gt=0)
    # StudyDate range of the C-FIND: today and the days before it (2: yesterday and today).
    date_range_days: int = Field(default=2, ge=1, le=366)
    # Only studies whose StudyDate + StudyTime lie within this many hours before now;
    # None: every study of the date range.
    window_hours: float | None = Field(default=12.0, gt=0)
    # A study without StudyTime is in the window when any part of its day is: include; or
    # never: exclude.
    untimed_studies: Literal["include", "exclude"] = "include"
    # The time zone of the PACS's StudyDate/StudyTime (IANA name); default: the machine's.
    timezone: TimeZone = None
    # smallest: per study, the series with the fewest images; max-images: every series with
    # fewer than max_images images; all: every series.
    selection: Literal["smallest", "max-images", "all"] = "smallest"
    max_images: int | None = Field(default=None, ge=1)
    # Also copy studies the local PACS has with fewer instances than the remote (the chosen
    # series it lacks, or has fewer instances of).
    include_incomplete: bool = False
    # C-MOVEs this process runs at once.
    movers: int = Field(default=2, ge=1, le=16)
    # A failed series is requested again after retry_initial_seconds, doubling per failure
    # up to retry_max_seconds (while a cycle still finds it missing).
    retry_initial_seconds: float = Field(default=60.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    # A move whose mover stopped renewing its claim this long ago (a crash) is requested
    # again; the local PACS is asked first whether the series arrived after all.
    claim_timeout_seconds: float = Field(default=300.0, gt=0)
    # How long a cycle waits for the moves it requested before it reports (they go on).
    cycle_timeout_seconds: float = Field(default=3600.0, gt=0)
    # How often movers look for requested series that no event announced to this process.
    poll_seconds: float = Field(default=5.0, gt=0)
    # Print each cycle's statistics table on standard output, besides the log line.
    print_statistics: bool = True

    @model_validator(mode="after")
    def _check_selection(self) -> SyncSettings:
        if self.selection == "max-images" and self.max_images is None:
            raise ValueError("selection max-images needs max_images")
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError("retry_max_seconds is shorter than retry_initial_seconds")
        return self


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
        # pacsflow's own router SCP, which takes several C-STOREs in flight.
        "router": Node(ae_title="PACSFLOW", host="127.0.0.1", port=11112, operations_window=8),
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
    def _redact_what_the_watcher_reads(self) -> Settings:
        # The folder names that give a patient's identity are the ones to keep out of logs.
        if self.logging.redact_folder_pattern is None and self.watcher.rename_pattern:
            self.logging.redact_folder_pattern = self.watcher.rename_pattern
        return self

    @model_validator(mode="after")
    def _engine_for_senders(self) -> Settings:
        # dicom.engine, when set, picks the uploader's engine too, unless that is set itself.
        if self.dicom.engine is not None and "engine" not in self.uploader.model_fields_set:
            self.uploader.engine = self.dicom.engine
        return self

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        for section, names in (("uploader", self.uploader.destinations),
                               ("watcher", self.watcher.destinations)):
            for name in names:
                if name not in self.nodes:
                    raise ValueError(f"{section}.destinations names {name!r}, which is not in nodes")
        # Names of nodes; the command line's AET@HOST:PORT form is checked where it is parsed.
        named = {"sync.remote": self.sync.remote, "sync.local": self.sync.local,
                 "harvester.source": self.harvester.source}
        for key, name in named.items():
            if name is not None and "@" not in name and name not in self.nodes:
                raise ValueError(f"{key} names {name!r}, which is not in nodes")
        for title, route in self.router.routes.items():
            for name in route.forward:
                if name not in self.nodes:
                    raise ValueError(
                        f"router.routes.{title}.forward names {name!r}, which is not in nodes")
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

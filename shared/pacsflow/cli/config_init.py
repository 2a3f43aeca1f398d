"""``pacsflow config init``: set pacsflow up by answering questions, testing each node.

It asks for this machine's AE title and receiving port, the local PACS and each remote PACS
(name, AE title, host, port), the import/archive/storage folders, where files go, and the
mail server; it C-ECHOes every node as it is entered and says what failed (refused, timeout,
AE title rejected), then writes a commented configuration file, checks it as ``config check``
does, and creates the folders. A password is read without echo and written to a file of its
own (mode 600) that the configuration names: never into the YAML, never onto the screen.

Answers can come from flags and from ``--answers FILE`` (YAML, the keys of :class:`Answers`);
in an interactive run they are the defaults offered, with ``--non-interactive`` they are
final. Exit 0: written, every node answered; 3: written, a node was unreachable; 1: written,
a node answered but refused (AE title rejected); 2: bad answers or the file exists.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pacsflow.cli.common import EXIT_OK, EXIT_USAGE, fail
from pacsflow.cli.echo import UNREACHABLE as _UNREACHABLE
from pacsflow.config import Node, load_settings, parse_node
from pacsflow.errors import ConfigError

__all__ = ["Answers", "NodeAnswer", "cmd_config_init", "render_config"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class NodeAnswer:
    """One DICOM node as entered: its name in ``nodes`` and its address."""

    name: str
    ae_title: str
    host: str
    port: int

    def node(self) -> Node:
        return Node(ae_title=self.ae_title, host=self.host, port=self.port)


@dataclass
class Answers:
    """Everything ``config init`` asks; also the shape of ``--answers FILE``."""

    ae_title: str = "PACSFLOW"
    router_port: int = 11112
    local: NodeAnswer | None = None
    remotes: list[NodeAnswer] = field(default_factory=list)
    import_folder: str = "data/inbox"
    archive_folder: str = "data/archive"
    storage_folder: str = "data/storage"
    quarantine_folder: str = "data/quarantine"
    # The state store (SQLite) and mails written as files; not asked, beside the others.
    data_folder: str = "data"
    destinations: list[str] = field(default_factory=lambda: ["router"])
    sync: bool = False
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_security: str = "none"  # none | starttls | tls
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_sender: str = "pacsflow@localhost"
    recipients: list[str] = field(default_factory=list)

    def nodes(self) -> list[NodeAnswer]:
        return ([self.local] if self.local else []) + self.remotes


def _node_answer(data: Any, where: str) -> NodeAnswer:
    if isinstance(data, str):
        name, _, address = data.partition("=")
        node = parse_node(address)
        return NodeAnswer(name, node.ae_title, node.host, node.port)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a node is name=AET@HOST:PORT or a mapping")
    try:
        return NodeAnswer(str(data["name"]), str(data["ae_title"]), str(data["host"]),
                          int(data["port"]))
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(f"{where}: a node needs name, ae_title, host and port ({err})") from err


def _load_answers(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"--answers {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--answers {path}: expected a mapping of answers")
    # Never a password in a file of answers: typed at the prompt, or from the environment.
    known = set(Answers.__dataclass_fields__) - {"smtp_password"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--answers {path}: unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return data


def initial_answers(args: argparse.Namespace, base: Path) -> Answers:
    """Defaults, then the answers file, then the flags (the last one given wins)."""
    answers = Answers(
        import_folder=str(base / "data/inbox"),
        archive_folder=str(base / "data/archive"),
        storage_folder=str(base / "data/storage"),
        quarantine_folder=str(base / "data/quarantine"),
        data_folder=str(base / "data"),
    )
    data = _load_answers(args.answers)
    for key, value in data.items():
        if key == "local":
            answers.local = None if value is None else _node_answer(value, "answers.local")
        elif key == "remotes":
            answers.remotes = [_node_answer(v, f"answers.remotes[{i}]")
                               for i, v in enumerate(value or [])]
        elif key in ("destinations", "recipients") and isinstance(value, str):
            setattr(answers, key, _split(value))
        else:
            setattr(answers, key, value)
    flags = {
        "ae_title": args.ae_title, "router_port": args.router_port,
        "import_folder": args.import_folder, "archive_folder": args.archive_folder,
        "storage_folder": args.storage_folder, "smtp_host": args.smtp_host,
        "smtp_port": args.smtp_port, "smtp_username": args.smtp_username,
        "smtp_sender": args.smtp_sender,
    }  # fmt: skip
    for key, value in flags.items():
        if value is not None:
            setattr(answers, key, value)
    if args.local is not None:
        answers.local = _node_answer(args.local, "--local")
    if args.remote:
        answers.remotes = [_node_answer(v, "--remote") for v in args.remote]
    if args.recipient:
        answers.recipients = list(args.recipient)
    if args.destination:
        answers.destinations = list(args.destination)
    if args.sync:
        answers.sync = True
    return answers


def _password_in_environment() -> bool:
    # Then every pacsflow process reads it from there: a password file would conflict.
    return bool(os.environ.get("PACSFLOW_NOTIFIER__SMTP__PASSWORD"))


# --- asking -----------------------------------------------------------------------------


class Prompter:
    """Questions on the terminal; every answer checked before it is taken."""

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def ask(self, question: str, default: str | None = None, *, required: bool = True,
            check: Any = None) -> str:
        """A line of text; the default on an empty answer; asked again until ``check`` passes."""
        hint = f" [{default}]" if default not in (None, "") else ""
        while True:
            try:
                reply = input(f"{question}{hint}: ").strip()
            except EOFError:
                raise ConfigError("config init: input ended before every question was "
                                  "answered (use --non-interactive with --answers)") from None
            value = reply or (default or "")
            if not value and required:
                self.say("  an answer is needed")
                continue
            if check is not None and value:
                try:
                    check(value)
                except (ValueError, ConfigError) as err:
                    self.say(f"  {err}")
                    continue
            return value

    def yes(self, question: str, default: bool) -> bool:
        hint = "Y/n" if default else "y/N"
        while True:
            reply = self.ask(f"{question} ({hint})", "", required=False).lower()
            if not reply:
                return default
            if reply in ("y", "yes", "n", "no"):
                return reply.startswith("y")
            self.say("  answer y or n")

    def secret(self, question: str) -> str:
        """A password, read without echo."""
        return getpass.getpass(f"{question} (not shown): ")


def _check_port(value: str) -> None:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("a port is a number from 1 to 65535")


def _check_ae_title(value: str) -> None:
    Node(ae_title=value, host="localhost", port=104)  # the model's own AE title rules


def _check_name(value: str) -> None:
    if not _NAME.match(value):
        raise ValueError("a name is letters, digits, '.', '_' or '-' (e.g. pacs-main)")


def _ask_node(ask: Prompter, role: str, current: NodeAnswer | None,
              taken: set[str]) -> NodeAnswer:
    def check_new_name(value: str) -> None:
        _check_name(value)
        if value in taken:
            raise ValueError(f"a node is already named {value!r}")

    name = ask.ask(f"  {role}: name in this configuration", current.name if current else None,
                   check=check_new_name)
    ae_title = ask.ask(f"  {role}: AE title", current.ae_title if current else None,
                       check=_check_ae_title)
    host = ask.ask(f"  {role}: host name or address", current.host if current else None)
    port = ask.ask(f"  {role}: port", str(current.port) if current else "104", check=_check_port)
    return NodeAnswer(name, ae_title, host, int(port))


def _ask_and_test_node(ask: Prompter, role: str, current: NodeAnswer | None, taken: set[str],
                       test: Any) -> NodeAnswer | None:
    """Ask for a node and C-ECHO it; on failure keep it, change it or leave it out."""
    while True:
        node = _ask_node(ask, role, current, taken)
        result = test(node)
        if result is None or result.ok:
            return node
        choice = ask.ask("  keep it anyway, change it, or drop it? (keep/change/drop)", "keep",
                         check=lambda v: _choice(v, ("keep", "change", "drop")))
        choice = _choice(choice, ("keep", "change", "drop"))
        if choice == "keep":
            return node
        if choice == "drop":
            return None
        current = node


def _choice(value: str, options: tuple[str, ...]) -> str:
    for option in options:
        if option.startswith(value.lower()):
            return option
    raise ValueError(f"answer one of: {', '.join(options)}")


def ask_everything(ask: Prompter, answers: Answers, test: Any) -> Answers:
    """Go through every question, offering ``answers`` as the defaults."""
    ask.say("pacsflow set-up: press Enter to take the [default].")
    ask.say()
    ask.say("This machine")
    answers.ae_title = ask.ask("  pacsflow's AE title (calling, and the router's called AE)",
                               answers.ae_title, check=_check_ae_title)
    answers.router_port = int(ask.ask("  port on which pacsflow receives images (router SCP)",
                                      str(answers.router_port), check=_check_port))
    ask.say()
    taken = {"router"}
    if ask.yes("Is there a local PACS (the one kept up to date, or sent to)?",
               answers.local is not None):
        answers.local = _ask_and_test_node(ask, "local PACS", answers.local, taken, test)
        if answers.local:
            taken.add(answers.local.name)
    else:
        answers.local = None
    remotes, offered = [], list(answers.remotes)
    while ask.yes("Add a remote PACS?" if not remotes else "Add another remote PACS?",
                  bool(offered)):
        current = offered.pop(0) if offered else None
        remote = _ask_and_test_node(ask, "remote PACS", current, taken, test)
        if remote:
            remotes.append(remote)
            taken.add(remote.name)
    answers.remotes = remotes
    ask.say()
    ask.say("Folders")
    answers.import_folder = ask.ask("  import folder (watched for new studies)",
                                    answers.import_folder)
    answers.archive_folder = ask.ask("  archive folder (sent files are moved here)",
                                     answers.archive_folder)
    answers.storage_folder = ask.ask("  storage folder (images received by the router)",
                                     answers.storage_folder)
    answers.quarantine_folder = ask.ask("  quarantine folder (files that are not DICOM)",
                                        answers.quarantine_folder)
    names = sorted(taken)

    def check_destinations(value: str) -> None:
        unknown = [n for n in _split(value) if n not in taken]
        if unknown:
            raise ValueError(f"unknown node(s) {', '.join(unknown)}; known: {', '.join(names)}")

    answers.destinations = _split(ask.ask(
        f"  send imported files to (node names, comma-separated; known: {', '.join(names)})",
        ", ".join(n for n in answers.destinations if n in taken) or "router",
        check=check_destinations))
    if answers.local and answers.remotes:
        answers.sync = ask.yes(
            f"Keep {answers.local.name} up to date with {answers.remotes[0].name} (sync)?",
            answers.sync)
    ask.say()
    ask.say("E-mail (leave the server empty to write mails as files instead)")
    answers.smtp_host = ask.ask("  SMTP server", answers.smtp_host or "", required=False) or None
    if answers.smtp_host:
        answers.smtp_security = _choice(ask.ask(
            "  security (none/starttls/tls)", answers.smtp_security,
            check=lambda v: _choice(v, ("none", "starttls", "tls"))),
            ("none", "starttls", "tls"))
        usual = {"none": 25, "starttls": 587, "tls": 465}
        port = (answers.smtp_port if answers.smtp_port not in usual.values()
                else usual[answers.smtp_security])
        answers.smtp_port = int(ask.ask("  SMTP port", str(port), check=_check_port))
        answers.smtp_username = ask.ask("  user name (empty: no login)",
                                        answers.smtp_username or "", required=False) or None
        if answers.smtp_username and _password_in_environment():
            ask.say("  password: from $PACSFLOW_NOTIFIER__SMTP__PASSWORD")
        elif answers.smtp_username:
            answers.smtp_password = ask.secret("  password") or None
    answers.smtp_sender = ask.ask("  sender address", answers.smtp_sender,
                                  check=_check_address)
    answers.recipients = _split(ask.ask(
        "  who is told about failures and completed studies (addresses, comma-separated)",
        ", ".join(answers.recipients), required=False, check=_check_addresses))
    return answers


def _split(value: str) -> list[str]:
    return [part.strip() for part in re.split(r"[,;\s]+", value) if part.strip()]


def _check_address(value: str) -> None:
    from pacsflow.config import check_email_address

    check_email_address(value)


def _check_addresses(value: str) -> None:
    for address in _split(value):
        _check_address(address)


# --- writing ----------------------------------------------------------------------------


def _q(value: Any) -> str:
    """A YAML scalar (JSON is YAML): strings quoted, so nothing is read as another type."""
    return json.dumps(value)


def render_config(answers: Answers, password_file: Path | None) -> str:
    """The configuration file: the answers with comments saying what each key does."""
    lines = [
        "# pacsflow configuration, written by `pacsflow config init`.",
        "# Every key, its default and its meaning: config/pacsflow.example.yaml.",
        "# Check after editing:  pacsflow config check THIS-FILE",
        "",
        "state:",
        "  backend: sqlite            # one machine; PostgreSQL: see the example configuration",
        f"  path: {_q(str(Path(answers.data_folder) / 'pacsflow.db'))}"
        "   # state, and the embedded event bus",
        "",
        "dicom:",
        f"  ae_title: {_q(answers.ae_title)}   # pacsflow's AE title when it calls a PACS",
        "",
        "nodes:                      # DICOM nodes by name (`pacsflow echo NAME` tests one)",
        "  router:                   # pacsflow's own receiver (the router SCP)",
        f"    ae_title: {_q(answers.ae_title)}",
        "    host: \"127.0.0.1\"",
        f"    port: {answers.router_port}",
        "    operations_window: 8     # C-STOREs in flight: the router SCP takes several",
    ]
    for role, node in ([("local PACS", answers.local)] if answers.local else []) + [
        ("remote PACS", r) for r in answers.remotes
    ]:
        lines += [
            f"  {node.name}:{' ' * max(1, 25 - len(node.name))}# {role}",
            f"    ae_title: {_q(node.ae_title)}",
            f"    host: {_q(node.host)}",
            f"    port: {node.port}",
        ]
    lines += [
        "",
        "watcher:",
        f"  import_folders: [{_q(answers.import_folder)}]   # watched for new studies",
        f"  archive_folder: {_q(answers.archive_folder)}   # sent files are moved here",
        f"  quarantine_folder: {_q(answers.quarantine_folder)}   # files that are not DICOM",
        "",
        "uploader:",
        f"  destinations: {_q(answers.destinations)}   # every imported file goes to each",
        "",
        "router:                     # receives images and files them by called AE title",
        f"  ae_title: {_q(answers.ae_title)}",
        f"  port: {answers.router_port}",
        "  routes:",
        f"    {_q(answers.ae_title)}:",
        f"      path: {_q(answers.storage_folder)}   # <PatientID>/<date_time>/<series>/",
        "",
        "notifier:",
        f"  mail_folder: {_q(str(Path(answers.data_folder) / 'mail'))}"
        "   # mails as files while no SMTP host is set",
        "  smtp:",
    ]
    if answers.smtp_host:
        lines += [
            f"    host: {_q(answers.smtp_host)}",
            f"    port: {answers.smtp_port}",
            f"    starttls: {'true' if answers.smtp_security == 'starttls' else 'false'}",
            f"    tls: {'true' if answers.smtp_security == 'tls' else 'false'}",
        ]
        if answers.smtp_username:
            lines.append(f"    username: {_q(answers.smtp_username)}")
        if password_file is not None:
            lines.append(f"    password_file: {_q(str(password_file))}"
                         "   # the password, readable by pacsflow only")
    else:
        lines.append("    # host: smtp.example.org   # without a host, mails are written to "
                     "mail_folder")
    lines.append(f"    sender: {_q(answers.smtp_sender)}")
    recipients = _q(answers.recipients)
    lines += [
        "  recipients:",
        f"    study-complete: {recipients}",
        f"    file-failed: {recipients}",
        f"    dead-letters: {recipients}",
    ]
    if answers.sync and answers.local and answers.remotes:
        lines += [
            "",
            "sync:                       # keeps the local PACS up to date with the remote one",
            f"  remote: {_q(answers.remotes[0].name)}",
            f"  local: {_q(answers.local.name)}",
        ]
    return "\n".join(lines) + "\n"


# --- the command ------------------------------------------------------------------------


def cmd_config_init(args: argparse.Namespace) -> int:
    """``pacsflow config init``."""
    from pacsflow.cli.echo import EchoResult, check_node, exit_code_of
    from pacsflow.dicom.options import NetworkOptions

    output = Path(args.output)
    if output.exists() and not args.force:
        return fail(f"{output} exists: choose another --output, or --force to replace it",
                    EXIT_USAGE)
    base = output.resolve().parent
    answers = initial_answers(args, base)
    interactive = not args.non_interactive
    if interactive and not sys.stdin.isatty():
        raise ConfigError("config init asks questions on a terminal: use --non-interactive "
                          "with flags or --answers FILE")
    ask = Prompter()
    results: dict[str, EchoResult] = {}

    def test(node: NodeAnswer) -> EchoResult | None:
        if args.no_echo:
            return None
        options = NetworkOptions(ae_title=answers.ae_title, connect_timeout=args.timeout,
                                 acse_timeout=args.timeout, dimse_timeout=args.timeout)
        ask.say(f"  C-ECHO {node.name} ({node.ae_title}@{node.host}:{node.port}) ...")
        result = check_node(node.node(), options)
        mark = "ok" if result.ok else ("UNREACHABLE" if result.outcome in _UNREACHABLE
                                       else "FAILED")
        ask.say(f"  C-ECHO {node.name}: {mark}: {result.message}")
        results[node.name] = result
        return result

    if interactive:
        answers = ask_everything(ask, answers, test)
    else:
        _check_answers(answers)  # before any node is called
        for node in answers.nodes():
            test(node)
    _check_answers(answers)
    password_file = None
    if answers.smtp_host and answers.smtp_password and not _password_in_environment():
        password_file = base / "secrets" / "smtp_password"
    output.parent.mkdir(parents=True, exist_ok=True)
    # Checked as `config check` does before it takes the place of anything: a file that
    # would not pass is never left behind.
    draft = output.with_name(f".{output.name}.draft")
    draft.write_text(render_config(answers, password_file), encoding="utf-8")
    try:
        settings = load_settings(draft)
    except ConfigError as err:
        draft.unlink()
        raise ConfigError(str(err).replace(str(draft), str(output))) from None
    if password_file is not None:
        password_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(answers.smtp_password or "")
    os.replace(draft, output)
    for folder in (*settings.watcher.import_folders, settings.watcher.archive_folder,
                   settings.watcher.quarantine_folder,
                   *(route.path for route in settings.router.routes.values())):
        folder.mkdir(parents=True, exist_ok=True)
    ask.say()
    ask.say(f"wrote {output} ({len(settings.nodes)} node(s)); it passes `pacsflow config check`")
    if password_file is not None:
        ask.say(f"the SMTP password is in {password_file} (mode 600), not in the configuration")
    elif answers.smtp_host and _password_in_environment():
        ask.say("the SMTP password comes from $PACSFLOW_NOTIFIER__SMTP__PASSWORD: set it for "
                "every pacsflow process")
    tested = [results[n.name] for n in answers.nodes() if n.name in results]
    bad = [(name, r) for name, r in results.items() if not r.ok
           and name in {n.name for n in answers.nodes()}]
    for name, result in bad:
        ask.say(f"  {name}: {'unreachable' if result.outcome in _UNREACHABLE else 'failed'}: "
                f"{result.message}")
    ask.say(f"start it with: pacsflow -c {output} run")
    code = exit_code_of(tested) if tested else EXIT_OK
    if code != EXIT_OK:
        kinds = ", ".join(f"{name} {'unreachable' if r.outcome in _UNREACHABLE else 'failed'}"
                          for name, r in bad)
        return fail(f"config init: wrote {output}, but {kinds}", code)
    return EXIT_OK


def _check_answers(answers: Answers) -> None:
    """ConfigError naming the first answer that cannot be right."""
    names = [n.name for n in answers.nodes()]
    try:
        _check_ae_title(answers.ae_title)
        _check_port(str(answers.router_port))
        for node in answers.nodes():
            _check_name(node.name)
            _check_ae_title(node.ae_title)
            _check_port(str(node.port))
    except (ValueError, ValidationError) as err:
        problem = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
        raise ConfigError(f"config init: {problem}") from None
    if "router" in names or len(set(names)) != len(names):
        raise ConfigError("config init: node names must differ from each other and from router")
    unknown = [d for d in answers.destinations if d not in {"router", *names}]
    if unknown:
        raise ConfigError(f"config init: destinations name unknown node(s) {unknown}")


def add_init_command(config_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``config init``."""
    init = config_commands.add_parser(
        "init", help="set pacsflow up by answering questions (tests each node with C-ECHO)",
        description="Asks for this machine's AE title and port, the local and remote PACS, "
                    "the folders and the mail server; C-ECHOes each node; writes a commented "
                    "configuration that passes `config check`. Flags and --answers FILE give "
                    "the defaults, or every answer with --non-interactive. The SMTP password "
                    "is asked without echo (or read from $PACSFLOW_NOTIFIER__SMTP__PASSWORD) "
                    "and kept in a file of its own. Exit 0: all nodes answered; 3: a node "
                    "unreachable; 1: a node refused; 2: bad answers.",
    )  # fmt: skip
    init.add_argument("-o", "--output", default="pacsflow.yaml", metavar="FILE",
                      help="the file to write (default pacsflow.yaml)")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.add_argument("--answers", metavar="FILE", help="answers as YAML (keys as the questions)")
    init.add_argument("--non-interactive", action="store_true",
                      help="ask nothing: take the flags, --answers and defaults")
    init.add_argument("--no-echo", action="store_true", help="do not C-ECHO the nodes")
    init.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                      help="per C-ECHO step (default 5)")
    init.add_argument("--ae-title", help="pacsflow's AE title")
    init.add_argument("--router-port", type=int, help="port pacsflow receives images on")
    init.add_argument("--local", metavar="NAME=AET@HOST:PORT", help="the local PACS")
    init.add_argument("--remote", action="append", metavar="NAME=AET@HOST:PORT",
                      help="a remote PACS (repeat for several)")
    init.add_argument("--destination", action="append", metavar="NODE",
                      help="where imported files go (repeat; default router)")
    init.add_argument("--sync", action="store_true",
                      help="keep the local PACS up to date with the first remote")
    init.add_argument("--import-folder", metavar="DIR")
    init.add_argument("--archive-folder", metavar="DIR")
    init.add_argument("--storage-folder", metavar="DIR")
    init.add_argument("--smtp-host")
    init.add_argument("--smtp-port", type=int)
    init.add_argument("--smtp-username")
    init.add_argument("--smtp-sender", metavar="ADDRESS")
    init.add_argument("--recipient", action="append", metavar="ADDRESS",
                      help="told about failures and completed studies (repeat)")
    init.set_defaults(func=cmd_config_init)

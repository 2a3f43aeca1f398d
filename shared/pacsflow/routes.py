"""Routes files: reading the router's routes (called AE title -> route) wherever they are needed.

The router receives by them; the notifier finds a route's e-mail list in them; the harvester
its C-MOVE destination's folder. ``router.routes_file``, when set, holds them instead of
``router.routes``; :class:`RoutesSource` re-reads the file when it changes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from pacsflow.config import AETitle, Route, RouterSettings
from pacsflow.errors import ConfigError

__all__ = ["RoutesSource", "load_routes_file", "routes_from_settings"]

log = logging.getLogger(__name__)

_ROUTES: TypeAdapter[dict[AETitle, Route]] = TypeAdapter(dict[AETitle, Route])


def _parse(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: neither JSON nor YAML: {err}") from err


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid routes"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def load_routes_file(path: Path, nodes: Collection[str] = ()) -> dict[str, Route]:
    """The routes of a YAML or JSON file; ConfigError naming the file and key when wrong.

    ``nodes`` are the configured node names that ``forward`` may use (not checked when empty).
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{source}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: not UTF-8 text: {err}") from err
    data = _parse(text, source)
    if isinstance(data, dict) and set(data) == {"routes"}:
        data = data["routes"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a mapping of called AE title to route")
    try:
        routes = _ROUTES.validate_python(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from err
    _check_forward(routes, nodes, source)
    return routes


def _check_forward(routes: Mapping[str, Route], nodes: Collection[str], source: str) -> None:
    if not nodes:
        return
    for title, route in routes.items():
        for name in route.forward:
            if name not in nodes:
                raise ConfigError(
                    f"{source}: {title}.forward names {name!r}, which is not in nodes"
                    f" (known: {', '.join(sorted(nodes))})"
                )


def routes_from_settings(settings: RouterSettings, nodes: Collection[str] = ()) -> dict[str, Route]:
    """The routes in force at start-up: the routes file when one is set, else ``routes``."""
    if settings.routes_file is not None:
        return load_routes_file(settings.routes_file, nodes)
    _check_forward(settings.routes, nodes, "router.routes")
    return dict(settings.routes)


class RoutesSource:
    """The routes in force for readers other than the router: ``router.routes``, or the
    routes file, read again when its modification time or size changes. A file that has
    become unreadable or invalid keeps the last good routes (the error is logged once)."""

    def __init__(self, settings: RouterSettings) -> None:
        self._settings = settings
        self._stamp: tuple[int, int] | None = None
        self._routes: dict[str, Route] = dict(settings.routes)
        self._failed_stamp: tuple[int, int] | None = None

    def current(self) -> Mapping[str, Route]:
        path = self._settings.routes_file
        if path is None:
            return self._routes
        try:
            stat = os.stat(path)
        except OSError as err:
            log.error("routes file %s: cannot read: %s", path, err.strerror)
            return self._routes
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp and stamp != self._failed_stamp:
            try:
                self._routes = load_routes_file(Path(path))
                self._stamp = stamp
            except ConfigError as err:
                self._failed_stamp = stamp
                log.error("%s; keeping the routes read before", err)
        return self._routes

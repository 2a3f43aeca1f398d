"""Routes: which called AE title goes where, who may send to it, and reloading the routes file.

A routes file is YAML or JSON: a mapping of called AE title to route, optionally under a
top-level ``routes:`` key. Each route is what :class:`pacsflow.config.Route` accepts::

    MRI_RESEARCH:
      path: /data/mri
      emails: [radiology@example.org]
      forward: [pacs-primary]                 # node names: file-ready for the uploader
      allowed_calling_aes: [MRI1, MRI2]       # empty: any calling AE
      allowed_addresses: [10.1.2.0/24]        # empty: any address
    CT: /data/ct                              # the older shapes: a path,
    PET: ["/data/pet", "a@example.org, b@example.org"]   # or [path, e-mails];
    SPECT: {"path": "/data/spect", "email": ["c@example.org"]}   # "email" for "emails"

A broken file on reload keeps the routes in force and logs why; associations already open
keep the route they were accepted with.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pacsflow.config import AETitle, Route, RouterSettings
from pacsflow.dicom.scp import AssociationInfo
from pacsflow.errors import ConfigError
from pydantic import TypeAdapter, ValidationError

from pacsflow_router.scp import Rejection

__all__ = ["ActiveRoute", "RouteTable", "load_routes_file", "routes_from_settings"]

log = logging.getLogger(__name__)

_ROUTES: TypeAdapter[dict[AETitle, Route]] = TypeAdapter(dict[AETitle, Route])

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(addresses: Collection[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(address, strict=False) for address in addresses)


def _address_allowed(host: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class ActiveRoute:
    """A route as the receiver uses it: its called AE title and an absolute folder."""

    ae_title: str
    root: Path
    forward: tuple[str, ...]
    allowed_calling_aes: frozenset[str]
    allowed_networks: tuple[Network, ...]

    @classmethod
    def build(cls, ae_title: str, route: Route) -> ActiveRoute:
        return cls(
            ae_title=ae_title,
            root=route.path.expanduser().absolute(),
            forward=tuple(route.forward),
            allowed_calling_aes=frozenset(route.allowed_calling_aes),
            allowed_networks=_networks(route.allowed_addresses),
        )


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


class RouteTable:
    """The routes in force and the association policy; replaced whole on reload."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        *,
        allowed_calling_aes: Collection[str] = (),
        allowed_addresses: Collection[str] = (),
    ) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, ActiveRoute] = {}
        self.allowed_calling_aes = frozenset(allowed_calling_aes)
        self.allowed_networks = _networks(allowed_addresses)
        self.replace(routes)

    def replace(self, routes: Mapping[str, Route]) -> None:
        """Put new routes in force (associations already accepted keep theirs)."""
        active = {
            title.strip(): ActiveRoute.build(title.strip(), route)
            for title, route in routes.items()
        }
        with self._lock:
            self._routes = active

    @property
    def titles(self) -> list[str]:
        return sorted(self._routes)

    def get(self, ae_title: str) -> ActiveRoute | None:
        return self._routes.get(ae_title)

    def resolve(self, info: AssociationInfo) -> Rejection | ActiveRoute:
        """The route an association request goes to, or why it is rejected."""
        if not _address_allowed(info.peer_host, self.allowed_networks):
            return Rejection.address_not_allowed()
        if self.allowed_calling_aes and info.calling_ae not in self.allowed_calling_aes:
            return Rejection.calling_ae_not_allowed()
        route = self._routes.get(info.called_ae)
        if route is None:
            return Rejection.called_ae_unknown()
        if route.allowed_calling_aes and info.calling_ae not in route.allowed_calling_aes:
            return Rejection.calling_ae_not_allowed()
        if not _address_allowed(info.peer_host, route.allowed_networks):
            return Rejection.address_not_allowed()
        return route

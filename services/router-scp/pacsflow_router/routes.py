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
import logging
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from pacsflow.config import Route
from pacsflow.dicom.scp import AssociationInfo
from pacsflow.routes import load_routes_file, routes_from_settings

from pacsflow_router.scp import Rejection

__all__ = ["ActiveRoute", "RouteTable", "load_routes_file", "routes_from_settings"]

log = logging.getLogger(__name__)

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

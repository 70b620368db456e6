"""How a gateway reaches its cluster, and who may reach the gateway (light: no web stack)."""

from __future__ import annotations

import dataclasses
import ipaddress

from linguamq.topics.client import BrokerUrl


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatewaySettings:
    broker_url: str
    cluster: str = "home"
    # The gateway's own login: it follows the cluster's topics for the dashboard with it (a
    # hub-role user on a secured cluster) and, on an open cluster, sends requests with it.
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    timeout: float = 120.0  # a request with no response for this long fails (504)

    @property
    def keys_required(self) -> bool:
        """A cluster that needs a login for us needs one for every caller (given as --username,
        or in the URL: mqtt://user:pass@host)."""
        return self.username is not None or BrokerUrl.parse(self.broker_url).username is not None


def check_exposure(host: str, keys_required: bool, open_: bool) -> None:
    """An open cluster is served on loopback only unless --open says otherwise."""
    if not (keys_required or open_ or is_loopback(host)):
        raise ValueError(f"the cluster has no users, so the API would be open to anyone reaching {host}: "
                         "secure the cluster (`linguamq hub --users FILE`) or pass --open")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""linguamq: one large language model across several small devices, over MQTT.

``import linguamq`` is light (a phone's node imports it too): the client API is loaded on
first use. The public API::

    with linguamq.Client("mqtt://hub.lan:1883") as client:
        print(client.generate("Hello", max_tokens=16).text)

``Client`` / ``AsyncClient`` (``linguamq.client``) and the errors they raise
(``linguamq.errors``) are the whole of it; everything else is the cluster's own packages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one source: pyproject reads it, nodes report it in their status

if TYPE_CHECKING:
    from linguamq.client import AsyncClient, Client, Result
    from linguamq.errors import ConnectionFailed, GenerationError, LinguamqError, NotAuthorized, RequestError, Timeout

__all__ = ["AsyncClient", "Client", "ConnectionFailed", "GenerationError", "LinguamqError", "NotAuthorized",
           "RequestError", "Result", "Timeout", "__version__"]
_LAZY = {name: "linguamq.client" for name in ("Client", "AsyncClient", "Result")} | {
    name: "linguamq.errors" for name in ("LinguamqError", "ConnectionFailed", "NotAuthorized", "Timeout",
                                         "RequestError", "GenerationError")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linguamq' has no attribute {name!r}")

"""The embedded MQTT broker of the hub: amqtt, in-process, with linguamq's fixes.

``EmbeddedBroker`` (async) and ``BrokerThread`` (its own thread and loop) start it;
``policy`` holds the read/publish/authenticate hooks, ``users`` the users file and its
password hashes, ``acl`` the rules derived from roles and topics that fill those hooks
(``secured``); ``amqtt_fixes`` lists, with line references, what is changed from amqtt
0.12.1 and why.
"""

from linguamq.broker.embedded import (
    DEFAULT_MAX_INFLIGHT_MESSAGES,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DEFAULT_SESSION_EXPIRY_S,
    DEFAULT_TLS_PORT,
    BrokerStats,
    BrokerThread,
    EmbeddedBroker,
    TlsListener,
)
from linguamq.broker.errors import (
    BrokerConfigError,
    BrokerError,
    BrokerNotRunningError,
    BrokerStartError,
    BrokerTimeoutError,
    PayloadTooLargeError,
)
from linguamq.broker.policy import Authenticate, ClientInfo, TopicPolicy, allow_all

__all__ = ["DEFAULT_MAX_INFLIGHT_MESSAGES", "DEFAULT_MAX_PAYLOAD", "DEFAULT_MAX_QUEUED_MESSAGES", "DEFAULT_SESSION_EXPIRY_S", "DEFAULT_TLS_PORT",
           "Authenticate", "BrokerConfigError", "BrokerError", "BrokerNotRunningError",
           "BrokerStartError", "BrokerStats", "BrokerThread", "BrokerTimeoutError", "ClientInfo", "EmbeddedBroker",
           "PayloadTooLargeError", "TlsListener", "TopicPolicy", "allow_all"]

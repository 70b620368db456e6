"""The embedded MQTT broker of the hub: amqtt, in-process, with linguamq's fixes.

``EmbeddedBroker`` (async) and ``BrokerThread`` (its own thread and loop) start it;
``policy`` holds the read/publish hooks later ACL work plugs into; ``amqtt_fixes`` lists,
with line references, what is changed from amqtt 0.12.1 and why.
"""

from linguamq.broker.embedded import DEFAULT_MAX_PAYLOAD, BrokerThread, EmbeddedBroker
from linguamq.broker.errors import (
    BrokerConfigError, BrokerError, BrokerNotRunningError, BrokerStartError, BrokerTimeoutError,
    PayloadTooLargeError,
)
from linguamq.broker.policy import ClientInfo, TopicPolicy, allow_all

__all__ = ["DEFAULT_MAX_PAYLOAD", "BrokerConfigError", "BrokerError", "BrokerNotRunningError",
           "BrokerStartError", "BrokerThread", "BrokerTimeoutError", "ClientInfo", "EmbeddedBroker",
           "PayloadTooLargeError", "TopicPolicy", "allow_all"]

"""The topic namespace: the only place topic strings are built or parsed."""

from linguamq.topics.errors import TopicError
from linguamq.topics.namespace import (
    ACT,
    ALL,
    BLOB_CHUNK,
    BLOB_REQUEST,
    CLIENT_RESPONSES,
    ERRORS,
    HUB_TELEMETRY,
    MAX_TOPIC_LEN,
    MODEL,
    NODE_ASSIGN,
    NODE_CONTROL,
    NODE_PROBE,
    NODE_STATUS,
    NODE_TELEMETRY,
    PING,
    PLAN,
    PONG,
    REQUESTS,
    REQUESTS_FROM,
    RESPONSES,
    ROOT,
    SESSION_OUT,
    Parsed,
    Topic,
    cluster_filter,
    is_id,
    matches,
    parse,
    response_topic,
    validate_id,
)

__all__ = ["ACT", "ALL", "BLOB_CHUNK", "BLOB_REQUEST", "CLIENT_RESPONSES", "ERRORS", "MAX_TOPIC_LEN", "MODEL",
           "HUB_TELEMETRY", "NODE_ASSIGN", "NODE_CONTROL", "NODE_PROBE", "NODE_STATUS", "NODE_TELEMETRY", "PING", "PLAN", "PONG", "REQUESTS", "REQUESTS_FROM", "RESPONSES", "ROOT",
           "SESSION_OUT", "Parsed", "Topic", "TopicError", "cluster_filter", "is_id", "matches", "parse", "response_topic", "validate_id"]

"""The topic namespace: builders, parsers, wildcards and id validation."""

from __future__ import annotations

import pytest

from linguamq import topics as T

SAMPLE = {"node": "phone-1", "session": "s_42", "request": "r1", "client": "cli-7",
          "sha256": "ab" * 32, "piece": 12}


def concrete(topic: T.Topic, cluster: str = "home") -> str:
    return topic.build(cluster, **{p: SAMPLE[p] for p in topic.params})


@pytest.mark.parametrize("topic", T.ALL, ids=lambda t: t.kind)
def test_every_topic_round_trips_through_its_parser(topic: T.Topic) -> None:
    built = concrete(topic)
    parsed = T.parse(built)
    assert parsed.topic is topic
    assert parsed.cluster == "home"
    assert parsed.params == {p: SAMPLE[p] for p in topic.params}
    assert built.startswith(f"{T.ROOT}/home/")


@pytest.mark.parametrize("topic", T.ALL, ids=lambda t: t.kind)
def test_each_wildcard_matches_its_own_topics_and_no_others(topic: T.Topic) -> None:
    for cluster_filter in (topic.filter(), topic.filter("home")):
        for other in T.ALL:
            assert T.matches(cluster_filter, concrete(other)) == (other is topic), (cluster_filter, other.kind)


def test_filter_pins_given_placeholders() -> None:
    mine = T.NODE_ASSIGN.filter("home", node="n1")
    assert T.matches(mine, T.NODE_ASSIGN.build("home", node="n1"))
    assert not T.matches(mine, T.NODE_ASSIGN.build("home", node="n2"))
    assert not T.matches(T.ACT.filter("home"), T.ACT.build("work", piece=0))


def test_cluster_filter_covers_everything_of_one_cluster_only() -> None:
    for topic in T.ALL:
        assert T.matches(T.cluster_filter("home"), concrete(topic))
        assert not T.matches(T.cluster_filter("home"), concrete(topic, "work"))


@pytest.mark.parametrize("bad", ["", "a+b", "a#", "x/y", "a\x00b", "a" * 65, "sp ace", "é", 7, None])
def test_invalid_ids_are_rejected_with_a_clear_error(bad: object) -> None:
    with pytest.raises(T.TopicError, match="invalid node"):
        T.NODE_STATUS.build("home", node=bad)  # type: ignore[arg-type]
    with pytest.raises(T.TopicError, match="invalid cluster"):
        T.MODEL.build(bad)  # type: ignore[arg-type]
    assert not T.is_id("client", bad)  # type: ignore[arg-type]  # the same rule, as a question


def test_a_valid_id_is_one() -> None:
    assert T.is_id("client", "alice") and T.is_id("request", "r-1_x2")


@pytest.mark.parametrize("bad", [-1, 1_000_000, "3", 2.0, True])
def test_invalid_pieces_are_rejected(bad: object) -> None:
    with pytest.raises(T.TopicError, match="piece"):
        T.ACT.build("home", piece=bad)  # type: ignore[arg-type]


def test_builders_demand_exactly_their_placeholders() -> None:
    with pytest.raises(T.TopicError, match="takes"):
        T.NODE_STATUS.build("home")
    with pytest.raises(T.TopicError, match="takes"):
        T.MODEL.build("home", node="n1")
    with pytest.raises(T.TopicError, match="no placeholder"):
        T.MODEL.filter("home", node="n1")


@pytest.mark.parametrize("bad", [
    "", "lmq", "lmq/home", "other/home/model", "lmq/home/unknown", "lmq/home/nodes/n1/status/x",
    "lmq/home/act/01", "lmq/home/act/-1", "lmq/home/act/x", "lmq/home//status", "lmq/ho+me/model",
    "lmq/home/nodes/+/status", "lmq/home/#", "lmq/home/blobs/ABCD/request", "/lmq/home/model",
    "lmq/home/model/", "lmq/home/" + "a/" * 200 + "model",
])
def test_parser_rejects_what_is_not_ours(bad: str) -> None:
    with pytest.raises(T.TopicError):
        T.parse(bad)


def test_over_long_topics_are_rejected() -> None:
    assert len(concrete(T.BLOB_CHUNK)) <= T.MAX_TOPIC_LEN
    with pytest.raises(T.TopicError, match="too long"):
        T.parse("lmq/home/" + "x" * T.MAX_TOPIC_LEN)


@pytest.mark.parametrize(("flt", "topic", "expected"), [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a/b/c", True), ("a/#", "a", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("a/+", "a/b/c", False), ("a/b", "a/b", True),
])
def test_matches_follows_mqtt_rules(flt: str, topic: str, expected: bool) -> None:
    assert T.matches(flt, topic) is expected


def test_retained_topics_are_the_state_topics() -> None:
    assert {t.kind for t in T.ALL if t.retain} == {"model", "plan", "node_status", "node_assign"}

"""`linguamq trace`: clock alignment, per-hop accounting, record/replay, Perfetto and PNG.

The integration part records one real 3-node generation (a hub and three node
processes on 127.0.0.1, a tiny llama) with the tracer's clock skewed by SKEW_S seconds,
so that every figure that comes out right has gone through the clock alignment.
"""

from __future__ import annotations

import io
import json
import random
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

from linguamq import topics
from linguamq.node.clock import ClockResponder
from linguamq.schemas.cluster import ClockPing, ClockPong, Plan, Stage
from linguamq.schemas.envelope import ActHeader, Hop
from linguamq.schemas.requests import ErrorReport, GenerateRequest, GenerateResult
from linguamq.tools import cli
from linguamq.tools.trace.clock import ClockEstimate, ClockEstimator, ClockSample
from linguamq.tools.trace.export import perfetto, write_perfetto, write_png
from linguamq.tools.trace.model import TraceError, TraceModel, accounting, replay
from linguamq.tools.trace.records import decode_event, encode_event, load
from linguamq.tools.trace.tracer import Tracer, TracerSettings
from linguamq.tools.trace.view import LiveView, render

SKEW_S = 7.5  # the tracer's clock runs this far ahead of the nodes' in the integration test
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --- the trace-event format subset we emit, as JSON Schema ---------------------------------

_TS = {"type": "number", "minimum": 0}
_COMMON = {"name": {"type": "string", "minLength": 1}, "cat": {"type": "string", "minLength": 1},
           "pid": {"type": "integer", "minimum": 0}, "tid": {"type": "integer", "minimum": 0},
           "args": {"type": "object"}}
TRACE_EVENT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "traceEvents": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/event"}},
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
    },
    "additionalProperties": False,
    "$defs": {
        "event": {"oneOf": [{"$ref": f"#/$defs/{k}"} for k in ("complete", "flow_start", "flow_end", "meta",
                                                               "instant")]},
        "complete": {"type": "object", "additionalProperties": False,
                     "required": ["name", "cat", "ph", "ts", "dur", "pid", "tid", "args"],
                     "properties": {**_COMMON, "ph": {"const": "X"}, "ts": _TS, "dur": _TS}},
        "flow_start": {"type": "object", "additionalProperties": False,
                       "required": ["name", "cat", "ph", "id", "ts", "pid", "tid"],
                       "properties": {**_COMMON, "ph": {"const": "s"}, "id": {"type": "integer"}, "ts": _TS}},
        "flow_end": {"type": "object", "additionalProperties": False,
                     "required": ["name", "cat", "ph", "id", "ts", "pid", "tid", "bp"],
                     "properties": {**_COMMON, "ph": {"const": "f"}, "id": {"type": "integer"}, "ts": _TS,
                                    "bp": {"const": "e"}}},
        "meta": {"type": "object", "additionalProperties": False, "required": ["name", "ph", "pid", "tid", "args"],
                 "properties": {**_COMMON, "ph": {"const": "M"},
                                "name": {"enum": ["process_name", "thread_name", "thread_sort_index"]},
                                "args": {"type": "object", "minProperties": 1, "maxProperties": 1}}},
        "instant": {"type": "object", "additionalProperties": False, "required": ["name", "ph", "ts", "s", "pid",
                                                                                 "tid"],
                    "properties": {**_COMMON, "ph": {"const": "i"}, "ts": _TS, "s": {"enum": ["g", "p", "t"]}}},
    },
}


def check_trace_events(doc: dict, *, hops: int) -> None:
    """Valid against the schema, and the events mean what they should."""
    jsonschema.Draft202012Validator.check_schema(TRACE_EVENT_SCHEMA)
    jsonschema.validate(doc, TRACE_EVENT_SCHEMA, cls=jsonschema.Draft202012Validator)
    events = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    compute = [e for e in events if e["ph"] == "X" and e["cat"] == "compute"]
    assert len(compute) == hops  # one slice per piece-run
    by_tid: dict[int, list[tuple[float, float]]] = {}
    for e in (e for e in events if e["ph"] == "X"):
        by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for e in compute:  # a node's slices never overlap
        assert names[e["tid"]] == e["args"]["node"]
        assert e["name"].startswith("pieces ") and f"{e['args']['session']}/{e['args']['step']}" in e["name"]
    for tid in {e["tid"] for e in compute}:
        spans = sorted(by_tid[tid])
        assert all(a[1] <= b[0] + 1e-3 for a, b in zip(spans, spans[1:])), names[tid]
    flows: dict[int, list[dict]] = {}
    for e in (e for e in events if e["ph"] in "sf"):
        flows.setdefault(e["id"], []).append(e)
        assert any(a <= e["ts"] <= b for a, b in by_tid.get(e["tid"], [])), f"flow {e} is in no slice of its track"
    assert flows and all(sorted(x["ph"] for x in pair) == ["f", "s"] for pair in flows.values())


# --- clocks ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float, offset: float = 0.0) -> None:
        self.now, self.offset = now, offset

    def __call__(self) -> float:
        return self.now + self.offset


def test_clock_offset_estimation_recovers_an_injected_offset() -> None:
    """Random asymmetric delays: the estimate is the least-rtt sample's, within its rtt/2."""
    rng, offset, true_now = random.Random(5), 3.217, 1_700_000_000.0
    estimator, samples = ClockEstimator(window=16), []
    for _ in range(40):
        fwd, back, proc = rng.uniform(0.001, 0.05), rng.uniform(0.001, 0.05), rng.uniform(0.0, 0.002)
        t0 = true_now
        t1 = true_now + fwd + offset
        sample = ClockSample(t0, t1, t1 + proc, true_now + fwd + proc + back)
        samples.append(sample)
        estimate = estimator.add("n1", sample)
        true_now += 0.5
    best = min(samples[-16:], key=lambda s: s.rtt)
    assert estimate.rtt_s == pytest.approx(best.rtt) and estimate.offset_s == pytest.approx(best.offset)
    assert abs(estimate.offset_s - offset) <= estimate.rtt_s / 2
    assert estimate.samples == 40
    # symmetric delays: exact; an impossible sample (negative rtt) is refused
    exact = ClockEstimator().add("n2", ClockSample(10.0, 10.01 - 2.0, 10.011 - 2.0, 10.021))
    assert exact.offset_s == pytest.approx(-2.0, abs=1e-9) and exact.rtt_s == pytest.approx(0.02)
    assert ClockEstimator().add("n3", ClockSample(10.0, 10.0, 12.0, 10.5)) is None


class FakeClient:
    def __init__(self) -> None:
        self.subs: dict[str, object] = {}
        self.published: list[tuple[str, object]] = []

    def subscribe(self, topic, filter_, handler, **kw) -> None:
        self.subs[filter_] = handler

    def publish(self, topic, name, payload, **kw) -> None:
        self.published.append((name, payload))


def test_clock_responder_answers_on_the_askers_topic_and_the_offset_comes_back() -> None:
    """A node whose clock is 42.125 s behind; 3 ms out, 1 ms back: the estimate is exact to 1 ms."""
    tracer_clock, node_clock = FakeClock(1_700_000_000.0), FakeClock(1_700_000_000.0, offset=-42.125)
    client = FakeClient()
    ClockResponder(client=client, cluster="home", node="n1", clock=node_clock).start()
    (filter_, handler), = client.subs.items()
    assert filter_ == topics.PING.build("home", node="n1")
    ping = ClockPing(client="trace-1", seq=1, t0=tracer_clock())
    for clock in (tracer_clock, node_clock):
        clock.now += 0.003
    handler(filter_, ping, False)
    (name, pong), = client.published
    assert name == topics.PONG.build("home", client="trace-1") and isinstance(pong, ClockPong) and pong.seq == 1 and pong.node == "n1"
    for clock in (tracer_clock, node_clock):
        clock.now += 0.001
    estimate = ClockEstimator().add(pong.node, ClockSample(pong.t0, pong.t1, pong.t2, tracer_clock()))
    assert estimate.offset_s == pytest.approx(-42.125 + 0.001, abs=1e-6)  # (3 ms - 1 ms) / 2 of asymmetry
    handler(filter_, ping, True)  # a retained ping is never answered
    assert len(client.published) == 1


# --- the model, on synthetic events ----------------------------------------------------------


def synthetic_events(ring: bool = False) -> list[dict]:
    """Two steps of one session over two nodes; n1's clock is 2 s ahead, n2's 1 s behind.
    With ``ring`` the tail sends step 1, 0.5 ms before token 0 reaches the tracer."""
    off = {"n1": 2.0, "n2": -1.0}
    plan = Plan(epoch=1, objective="even", predicted_ms_per_token=5.0,
                stages=(Stage(node="n1", first=0, last=1, predicted_ms=1.0),
                        Stage(node="n2", first=2, last=3, predicted_ms=1.0)))
    events: list[dict] = [{"kind": "meta", "t": 100.0, "cluster": "home"}, {"kind": "plan", "t": 100.0, "msg": plan}]
    events += [ClockEstimate(node=n, t=100.0, offset_s=o, rtt_s=0.001, samples=1).to_event() for n, o in off.items()]

    def hop(node: str, first: int, last: int, *times: float) -> Hop:
        return Hop(node=node, first=first, last=last, **dict(zip(("t_recv", "t_start", "t_end", "t_send"),
                                                                 (x + off[node] for x in times))))

    for step, t in ((0, 101.0), (1, 101.0115 if ring else 101.1)):
        header = dict(session="s1", request="s1", step=step, epoch=1, start_pos=step and 5, chain=1,
                      ring=4 if ring else 0)
        events.append({"kind": "input", "t": t, "msg": ActHeader(
            dtype="int64", shape=(1, 5 if step == 0 else 1), piece=0, **header)})
        hops = (hop("n1", 0, 1, t + 0.001, t + 0.002, t + 0.005, t + 0.005),
                hop("n2", 2, 3, t + 0.007, t + 0.007, t + 0.010, t + 0.0105))
        events.append({"kind": "step", "t": t + 0.012, "token": 7 + step, "msg": ActHeader(
            dtype="int64", shape=(1, 1), piece=4, hops=hops, **header)})
    return events


def test_a_step_the_tail_sent_is_labelled_the_tails() -> None:
    head, tail = (replay(synthetic_events(ring)).timings()[1] for ring in (False, True))
    assert not head.trace.ring and "head 88.0 | head>  1.0 |" in head.describe()
    # The ring: the step left the tail before its token; the hop to n1 is the tail's
    assert tail.trace.ring and tail.head_ms == pytest.approx(-0.5) and tail.head_to_first_ms == pytest.approx(1.0)
    assert "tail -0.5 | tail>  1.0 |" in tail.describe() and "head" not in tail.describe()
    assert tail.cycle_ms == pytest.approx(11.5)  # = t_out(1) - t_out(0), as without the ring


def test_timings_put_every_node_on_the_tracers_clock() -> None:
    model = replay(synthetic_events())
    first, second = model.timings()
    assert first.head_ms is None and first.cycle_ms is None  # no previous token
    t = second
    assert [h.node for h in t.hops] == ["n1", "n2"]
    assert t.head_ms == pytest.approx(100 - 12)  # 101.1 - 101.012
    assert t.head_to_first_ms == pytest.approx(1.0)
    assert [h.queue_ms for h in t.hops] == pytest.approx([1.0, 0.0])
    assert [h.compute_ms for h in t.hops] == pytest.approx([3.0, 3.0])
    assert [h.transfer_ms for h in t.hops] == pytest.approx([2.0, 1.5])  # n1 -> n2, n2 -> head
    assert t.pipeline_ms == pytest.approx(12.0)
    assert t.cycle_ms == pytest.approx(100.0)  # = t_out(1) - t_out(0)
    assert accounting(model, "s1") == pytest.approx({"steps": 1, "pipeline_ms": 12.0, "head_ms": 88.0,
                                                     "cycle_ms": 100.0, "observed_ms_per_token": 100.0})
    stats = {s.node: s for s in model.node_stats()}
    assert list(stats) == ["n1", "n2"] and stats["n1"].pieces == "0-1"
    assert stats["n1"].offset_ms == pytest.approx(2000.0) and stats["n2"].ms_per_step == pytest.approx(3.0)


def test_a_record_replays_to_the_same_figures(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(encode_event(e) + "\n" for e in synthetic_events()))
    live, replayed = replay(synthetic_events()), load(path)
    assert [t.cycle_ms for t in replayed.timings()] == [t.cycle_ms for t in live.timings()]
    assert [t.hops for t in replayed.timings()] == [t.hops for t in live.timings()]
    assert load(path, request="other").step_count == 0
    with pytest.raises(TraceError, match="not a trace event"):
        decode_event('{"kind": "step", "t": 1, "msg": {"type": "plan"}}')


def test_a_request_is_followed_through_its_session_ids(tmp_path: Path) -> None:
    """Session ids on the wire are derived from (client, request id): a node's error names
    the session, and still belongs to the request followed."""
    events = synthetic_events()
    for sid, ref in (("s1", "s1"), ("s1", None), ("other", "other")):
        events.append({"kind": "error", "t": 102.0, "msg": ErrorReport(
            reporter="n1", topic=topics.ACT.build("home", piece=0), code="unknown_session", message=f"{sid}?", ref=ref, ts=1.0)})
    path = tmp_path / "t.jsonl"
    path.write_text("".join(encode_event(e) + "\n" for e in events).replace('"request":"s1"', '"request":"r1"'))
    model = load(path, request="r1")
    assert model.step_count == 2 and [e.ref for _, e in model.errors] == ["s1", None]


def test_live_view_redraws_on_a_terminal_and_appends_lines_otherwise() -> None:
    model = TraceModel()
    events = synthetic_events()
    for e in events[:4]:
        model.apply(e)
    tty, plain = io.StringIO(), io.StringIO()
    tty_view, plain_view = LiveView(model, out=tty, tty=True), LiveView(model, out=plain, tty=False)
    for view in (tty_view, plain_view):
        view.tick(now=101.0)
    for e in events[4:]:
        model.apply(e)
    for view in (tty_view, plain_view):
        view.tick(now=101.2)
    screens = tty.getvalue().split("\x1b[H\x1b[2J")
    assert len(screens) == 3 and "(no step seen yet)" in screens[1] and "n2[2-3] q0.0 c3.0" in screens[2]
    lines = plain.getvalue().splitlines()
    assert "\x1b" not in plain.getvalue()
    assert lines[0].startswith("epoch 1: n1:0-1 n2:2-3")
    assert sum(line.startswith("step ") for line in lines) == 2
    assert any(line.startswith("node n1 pieces 0-1") for line in lines)
    assert "100.0 ms" in render(model)


def test_png_export_says_what_is_missing_without_matplotlib(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TraceError, match=r"linguamq\[viz\]"):
        write_png(replay(synthetic_events()), tmp_path / "x.png")


def test_synthetic_perfetto_export_is_valid() -> None:
    check_trace_events(perfetto(replay(synthetic_events())), hops=4)


# --- a real 3-node generation ----------------------------------------------------------------


@dataclass
class Recorded:
    url: str
    cluster: str
    record: Path
    result: GenerateResult
    model: TraceModel
    tmp: Path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    from linguamq.client import generate_remote, new_request_id
    from linguamq.models.export import ExportOptions, export_model
    from linguamq.models.tiny import TinySpec, make_tiny
    from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
    from linguamq.topics.client import MqttClient, wait_for

    tmp = tmp_path_factory.mktemp("trace")
    make_tiny(TinySpec(family="llama", layers=3, hidden=64, heads=4, vocab=512, seed=23), tmp / "hf")
    export_model(tmp / "hf", tmp / "art", ExportOptions())
    nodes = [NodeSpec("n1"), NodeSpec("n2"), NodeSpec("n3")]
    # The even split: three stages whatever the planner would do (one fast node does alone).
    with LocalCluster(artifacts=tmp / "art", nodes=nodes, workdir=tmp / "cluster", cluster="trace",
                      objective="even") as cluster, \
            MqttClient(url=cluster.url, client_id="test-trace") as client:
        cluster.wait_ready(client, nodes=3, timeout=90)
        settings = TracerSettings(cluster="trace", record=tmp / "rec.jsonl", results=True)
        with Tracer(url=cluster.url, settings=settings, clock=lambda: time.time() + SKEW_S) as tracer:
            wait_for(lambda: all(tracer.model.aligner.estimate(n.name) for n in nodes), 15, "clock estimates")
            request = GenerateRequest(id=new_request_id(), prompt="Hello world", max_tokens=24)
            result = generate_remote(client, "trace", request, timeout=60)
            wait_for(lambda: request.id in tracer.model.results, 5, "the result at the tracer")
        yield Recorded(cluster.url, "trace", tmp / "rec.jsonl", result, load(tmp / "rec.jsonl"), tmp)


@pytest.mark.integration
@pytest.mark.slow
def test_clock_alignment_recovers_the_tracers_skew(recorded: Recorded) -> None:
    for node in ("n1", "n2", "n3"):  # one machine: the only offset is the injected one
        est = recorded.model.aligner.estimate(node)
        assert est.samples >= 3
        assert abs(est.offset_s - -SKEW_S) <= est.rtt_s / 2 + 1e-4, est


@pytest.mark.integration
@pytest.mark.slow
def test_per_hop_figures_add_up_to_the_heads_ms_per_token(recorded: Recorded) -> None:
    result, model = recorded.result, recorded.model
    assert result.error is None and len(result.tokens) >= 10
    decode = [t for t in model.timings() if t.trace.request == result.request and t.trace.step >= 1]
    assert len(decode) == len(result.tokens) - 1  # every decode step seen, input and output
    sums = []
    for t in decode:
        assert [h.node for h in t.hops] == ["n1", "n2", "n3"]
        assert [h.first for h in t.hops] == [0, t.hops[0].last + 1, t.hops[1].last + 1]
        parts = [t.head_ms, t.head_to_first_ms] + [x for h in t.hops
                                                   for x in (h.queue_ms, h.compute_ms, h.send_ms, h.transfer_ms)]
        # aligned: no part is off by the 7.5 s skew (the tracer's own delivery jitter is a few ms; the
        # ring's lead, a negative head part, is the head's lag behind the tail: 58 ms seen under load)
        assert all(-1_000 < x < 5_000 for x in parts), t.describe()
        assert all(h.compute_ms > 0 for h in t.hops)
        sums.append(sum(parts))
    per_token = sum(sums) / len(sums)
    assert per_token == pytest.approx(result.ms_per_token, rel=0.10), (per_token, result.ms_per_token)
    assert [p for h in decode[0].hops for p in range(h.first, h.last + 1)] == list(range(5))  # embed, 3 layers, head
    assert accounting(model, result.request)["head_ms_per_token"] == result.ms_per_token


@pytest.mark.integration
@pytest.mark.slow
def test_recorded_generation_exports_valid_perfetto_and_png(recorded: Recorded, capsys) -> None:
    out, png = recorded.tmp / "trace.json", recorded.tmp / "trace.png"
    code = cli.main(["trace", "--from", str(recorded.record), "--perfetto", str(out), "--png", str(png), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["nodes"] == ["n1", "n2", "n3"] and recorded.result.request in summary["requests"]
    doc = json.loads(out.read_text())
    check_trace_events(doc, hops=3 * len(recorded.result.tokens))
    threads = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert {"n1", "n2", "n3"} <= threads
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    write_perfetto(recorded.model, recorded.tmp / "again.json")  # the library path, same document
    assert json.loads((recorded.tmp / "again.json").read_text()) == doc


@pytest.mark.integration
@pytest.mark.slow
def test_live_command_follows_one_request_and_records_it(recorded: Recorded, capsys) -> None:
    from linguamq.client import generate_remote
    from linguamq.topics.client import MqttClient

    record = recorded.tmp / "live.jsonl"
    results: list[GenerateResult] = []

    def generate() -> None:
        time.sleep(0.5)  # the tracer connects first
        with MqttClient(url=recorded.url, client_id="test-trace-live") as client:
            for rid in ("live-other", "live-1"):
                results.append(generate_remote(client, recorded.cluster, GenerateRequest(
                    id=rid, prompt="Once upon a time", max_tokens=8), timeout=30))

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    code = cli.main(["trace", "--broker", recorded.url, "--cluster", recorded.cluster, "--request", "live-1",
                     "--record", str(record), "--duration", "3"])
    thread.join(timeout=30)
    assert code == 0 and [r.error for r in results] == [None, None]
    out = capsys.readouterr().out
    assert "step live-1" in out and "live-other" not in out and "\x1b" not in out
    model = load(record)
    assert model.step_count == len(results[1].tokens) and {s.request for s in model.snapshot()} == {"live-1"}
    assert accounting(model, "live-1")["head_ms_per_token"] == results[1].ms_per_token

"""The distributed pipeline end to end: a hub and three node processes on 127.0.0.1.

Every test compares with run-local, the single-process reference: a distributed run
must produce the very same tokens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from linguamq import topics
from linguamq.client import generate_remote, new_request_id
from linguamq.schemas import envelope
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.manifest import ModelManifest, file_sha256
from linguamq.schemas.requests import ErrorReport, GenerateRequest, GenerateResult, Sampling, TokenEvent
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = [NodeSpec("n1"), NodeSpec("n2", slowdown=1.5), NodeSpec("n3", slowdown=2.0)]
PROMPTS = ["Hello world", "The quick brown fox", "MQTT carries tensors", "a", "Once upon a time there was",
           "0123456789", "pub/sub middleware", "Phones on a home Wi-Fi"]
FAMILIES = ("llama", "qwen2", "bloom")


class Running:
    def __init__(self, cluster: LocalCluster, client: MqttClient, art: Path) -> None:
        self.cluster, self.client, self.art = cluster, client, art
        self.manifest = ModelManifest.from_json((art / "manifest.json").read_bytes())

    def generate(self, prompt: str, max_tokens: int = 24, **fields) -> GenerateResult:
        request = GenerateRequest(id=new_request_id(), prompt=prompt, max_tokens=max_tokens, **fields)
        return generate_remote(self.client, self.cluster.cluster, request, timeout=60)


def start(art: Path, workdir: Path, cluster: str, broker_url: str | None = None,
          hub_args: tuple[str, ...] = (), nodes: list[NodeSpec] = NODES) -> Iterator[Running]:
    # The even split puts every node to work: these tests are about the pipeline, not the plan.
    # Prompts go in chunks of 2 tokens: most of them are several chunks, which must change nothing.
    with LocalCluster(artifacts=art, nodes=nodes, workdir=workdir, cluster=cluster, broker_url=broker_url,
                      objective="even", hub_args=("--prefill-chunk", "2", *hub_args)) as c:
        with MqttClient(url=c.url, client_id=f"test-{cluster}") as client:
            c.wait_ready(client, nodes=len(nodes), timeout=90)
            yield Running(c, client, art)


@pytest.fixture(scope="module", params=FAMILIES)
def running(request, artifacts, tmp_path_factory) -> Iterator[Running]:
    family = request.param
    yield from start(artifacts[family], tmp_path_factory.mktemp(f"cluster-{family}"), f"t-{family}")


def test_greedy_generation_equals_run_local(running: Running, reference) -> None:
    for prompt in PROMPTS[:2]:
        result = running.generate(prompt, max_tokens=24)
        assert result.error is None
        assert result.tokens == reference(running.art, prompt, 24)
        assert result.stop_reason in ("max_tokens", "eos")


CONCURRENT = [*PROMPTS, *(f"{p}, again" for p in PROMPTS)]  # 16 requests


class Batches:
    """The largest batch each node ran while open (its telemetry: batch runs that grew)."""

    def __init__(self, run: Running) -> None:
        self.largest: dict[str, int] = {}
        self._first: dict[tuple[str, int, int], int] = {}  # (node, piece, rows) -> runs when first seen
        self._client, self._filter = run.client, topics.NODE_TELEMETRY.filter(run.cluster.cluster)

    def __enter__(self) -> Batches:
        self._client.subscribe(topics.NODE_TELEMETRY, self._filter, self._on_telemetry, wait=10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.unsubscribe(self._filter)

    def _on_telemetry(self, _topic: str, report, _retained: bool) -> None:
        first_report = report.node not in self.largest  # what it ran before: the baseline; anything new: 0
        base = {(report.node, b.piece, b.rows): b.runs if first_report else 0 for b in report.batches}
        grew = [b.rows for b in report.batches
                if b.runs > self._first.setdefault((report.node, b.piece, b.rows), base[report.node, b.piece, b.rows])]
        self.largest[report.node] = max([self.largest.get(report.node, 1), *grew])


def sixteen_concurrent(run: Running, reference) -> dict[str, int]:
    """16 concurrent requests, each equal to its run-local; the largest batch per node."""
    with Batches(run) as batches, concurrent.futures.ThreadPoolExecutor(len(CONCURRENT)) as pool:
        results = list(pool.map(lambda p: run.generate(p, max_tokens=16), CONCURRENT))
        time.sleep(1.5)  # a telemetry report after the last batch
    for prompt, result in zip(CONCURRENT, results):
        assert result.error is None, result.error
        assert result.tokens == reference(run.art, prompt, 16), prompt
    return batches.largest


def test_sixteen_concurrent_requests_each_equal_their_run_local(running: Running, reference) -> None:
    largest = sixteen_concurrent(running, reference)
    if running.manifest.batch_rows:  # rotary families batch; bloom's concatenated cache runs one at a time
        assert max(largest.values()) >= 2, largest
    else:
        assert set(largest.values()) == {1}, largest


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # bloom runs one session a call either way (test above)
def test_sixteen_concurrent_requests_with_batching_off_equal_their_run_local(family, artifacts, reference,
                                                                             tmp_path) -> None:
    nodes = [dataclasses.replace(n, args=("--max-batch", "1")) for n in NODES]
    for run in start(artifacts[family], tmp_path, f"t-{family}-nobatch", nodes=nodes):
        assert set(sixteen_concurrent(run, reference).values()) == {1}


def steps_in_order(run: Running, prompt: str, max_tokens: int) -> tuple[GenerateResult, list[tuple[str, int]]]:
    """A request's result, and its steps' inputs on act/0 ("act", step; not its end) and outputs
    ("out", step) in the order a client of the broker sees them (one publisher's messages keep
    theirs)."""
    seen: list[tuple[str, int, str]] = []
    act, out = topics.ACT.build(run.cluster.cluster, piece=0), topics.SESSION_OUT.filter(run.cluster.cluster)
    run.client.subscribe(topics.ACT, act, lambda _t, v, _r: v[0].end or seen.append(("act", v[0].step, v[0].request)),
                         wait=10)
    run.client.subscribe(topics.SESSION_OUT, out, lambda _t, v, _r: seen.append(("out", v[0].step, v[0].request)),
                         wait=10)
    try:
        result = run.generate(prompt, max_tokens=max_tokens)
    finally:
        run.client.unsubscribe(act)
        run.client.unsubscribe(out)
    return result, [(kind, step) for kind, step, request in list(seen) if request == result.request]


def test_the_tail_sends_each_next_step_before_its_token_reaches_the_head(running: Running, reference) -> None:
    result, order = steps_in_order(running, PROMPTS[1], 8)
    assert result.tokens == reference(running.art, PROMPTS[1], 8)
    decodes = [k for kind, k in order if kind == "act" and k > 0]
    assert decodes == list(range(1, len(result.tokens)))
    for k in decodes:  # the ring: step k left the tail before the token of step k - 1
        assert order.index(("act", k)) < order.index(("out", k - 1)), order


SAMPLED = Sampling(temperature=1.0, top_k=40, seed=1234)  # sampling is a function of (seed, step)


def test_seeded_sampling_equals_run_local(running: Running, reference) -> None:
    # With the ring the tail sends each step and samples it: a step it numbered wrong would
    # sample another token than run-local (greedy would not show it: every step the same).
    expected = reference(running.art, PROMPTS[4], 16, SAMPLED)
    assert expected != reference(running.art, PROMPTS[4], 16)  # the sampling matters here
    assert running.generate(PROMPTS[4], max_tokens=16, sampling=SAMPLED).tokens == expected


def test_without_the_ring_the_head_sends_each_step(artifacts, tmp_path, reference) -> None:
    for run in start(artifacts["llama"], tmp_path, "t-noring", hub_args=("--no-ring",)):
        for prompt in PROMPTS[:2]:
            assert run.generate(prompt, max_tokens=24).tokens == reference(run.art, prompt, 24)
        # the same seeded sampling as the ring's (test_seeded_sampling_equals_run_local): the same tokens
        assert run.generate(PROMPTS[4], max_tokens=16, sampling=SAMPLED).tokens == \
            reference(run.art, PROMPTS[4], 16, SAMPLED)
        result, order = steps_in_order(run, PROMPTS[4], 8)
        assert result.tokens == reference(run.art, PROMPTS[4], 8)
        for k in range(1, len(result.tokens)):  # the head sent step k once the token of step k - 1 came
            assert order.index(("out", k - 1)) < order.index(("act", k)), order


def test_a_stop_string_ends_the_request_with_its_text_and_no_token_after_it(running: Running, reference) -> None:
    tokenizer = Tokenizer.from_file(str(running.art / running.manifest.tokenizer_file))
    full = reference(running.art, PROMPTS[0], 24)

    def text(n: int) -> str:
        return tokenizer.decode(list(full[:n]), skip_special_tokens=True)

    whole = text(len(full))
    at = next(a for a in range(len(whole) // 3, len(whole) - 3) if whole.find(whole[a:a + 3]) == a
              and whole[a:a + 3].strip())
    stop = whole[at:at + 3]
    n = next(n for n in range(1, len(full) + 1) if stop in text(n))  # the token that completes it
    assert n < len(full)  # the pipeline had more tokens to give
    seen: queue.Queue[TokenEvent | GenerateResult] = queue.Queue()  # all the head published (the client skips repeats)
    request = GenerateRequest(id=new_request_id(), prompt=PROMPTS[0], max_tokens=24, stop=(stop,))
    with MqttClient(url=running.cluster.url, client_id="test-stop-watch") as watch:
        watch.subscribe(topics.RESPONSES, topics.RESPONSES.build(running.cluster.cluster, request=request.id),
                        lambda _t, v, _r: seen.put(v), wait=10)
        result = generate_remote(running.client, running.cluster.cluster, request, timeout=60)
        events = list(iter(lambda: seen.get(timeout=10), result))  # up to the result, in the order published
    assert (result.stop_reason, result.text, result.tokens) == ("stop", whole[:at], full[:n])
    assert "".join(e.text for e in events) == result.text and all(e.index < n for e in events)


def test_nodes_fetched_their_pieces_over_mqtt(running: Running) -> None:
    plan = running.cluster.plan
    for stage in plan.stages:
        blobs = running.cluster.workdir / f"cache-{stage.node}" / "blobs"
        for piece in running.manifest.pieces[stage.first:stage.last + 1]:
            assert file_sha256(blobs / piece.sha256) == piece.sha256


def test_the_same_pipeline_runs_on_mosquitto(artifacts, mosquitto, tmp_path, reference) -> None:
    for run in start(artifacts["llama"], tmp_path, "t-mosq", broker_url=mosquitto):
        result = run.generate(PROMPTS[2], max_tokens=24)
        assert result.tokens == reference(run.art, PROMPTS[2], 24)


def test_a_corrupted_cached_piece_is_fetched_again(artifacts, tmp_path, reference) -> None:
    for run in start(artifacts["llama"], tmp_path, "t-corrupt"):
        stage = run.cluster.plan.stages[0]
        blob = tmp_path / f"cache-{stage.node}" / "blobs" / run.manifest.pieces[stage.first].sha256
        run.cluster.kill_node(stage.node, sig=15)
        epoch = run.cluster.wait_ready(run.client, nodes=2).epoch
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        run.cluster.start_node(next(n for n in NODES if n.name == stage.node))
        run.cluster.wait_ready(run.client, nodes=3, after_epoch=epoch)
        assert file_sha256(blob) == run.manifest.pieces[stage.first].sha256
        assert run.generate(PROMPTS[0]).tokens == reference(run.art, PROMPTS[0], 24)


# --- bad input: reported on errors/, and the pipeline keeps serving ------------------------

@pytest.fixture(scope="module")
def llama(artifacts, tmp_path_factory) -> Iterator[Running]:
    yield from start(artifacts["llama"], tmp_path_factory.mktemp("cluster-bad"), "t-bad")


@pytest.fixture()
def errors(llama: Running) -> Iterator[queue.Queue]:
    inbox: queue.Queue[ErrorReport] = queue.Queue()
    name = topics.ERRORS.filter(llama.cluster.cluster)
    llama.client.subscribe(topics.ERRORS, name, lambda _t, report, _r: inbox.put(report), wait=10)
    yield inbox
    llama.client.unsubscribe(name)


def next_report(inbox: queue.Queue, **want) -> ErrorReport:
    while True:
        report = inbox.get(timeout=20)
        if all(getattr(report, k) == v for k, v in want.items()):
            return report


def act(llama: Running, piece: int, header: ActHeader, array: np.ndarray) -> None:
    llama.client.publish(topics.ACT, topics.ACT.build(llama.cluster.cluster, piece=piece),
                         envelope.encode(header, array))


def stage_of(llama: Running, piece: int) -> str:
    return next(s.node for s in llama.cluster.plan.stages if s.first == piece)


def test_garbage_on_an_activation_topic_is_reported(llama: Running, errors: queue.Queue) -> None:
    llama.client.publish_raw(topics.ACT.build(llama.cluster.cluster, piece=0), b"\x00garbage", qos=1)
    report = next_report(errors, reporter=stage_of(llama, 0), code="bad_payload")
    assert "magic" in report.message


@pytest.mark.parametrize(("tensor", "why"), [
    (np.zeros((1, 3), dtype=np.float32), "token ids"),
    (np.zeros((2, 3), dtype=np.int64), "shape"),
])
def test_wrong_dtype_or_shape_is_reported(llama: Running, errors: queue.Queue, tensor, why) -> None:
    header = ActHeader.for_tensor(tensor, session="bad-shape", step=0, epoch=llama.cluster.plan.epoch, piece=0,
                                  start_pos=0)
    act(llama, 0, header, tensor)
    assert why in next_report(errors, ref="bad-shape", code="bad_request").message


def test_unknown_session_and_stale_epoch_are_reported(llama: Running, errors: queue.Queue) -> None:
    second = llama.cluster.plan.stages[1]
    hidden = np.zeros((1, 1, llama.manifest.hidden_size), dtype=np.float32)
    epoch = llama.cluster.plan.epoch
    act(llama, second.first, ActHeader.for_tensor(hidden, session="ghost", step=4, epoch=epoch, piece=second.first,
                                                  start_pos=7), hidden)
    assert next_report(errors, ref="ghost").code == "unknown_session"
    act(llama, second.first, ActHeader.for_tensor(hidden, session="old", step=0, epoch=epoch - 1 if epoch else 99,
                                                  piece=second.first, start_pos=0), hidden)
    assert next_report(errors, ref="old").code == "stale_epoch"


@pytest.mark.parametrize(("payload", "code"), [
    (b'{"id":"bad1","prompt":"hi","max_tokens":0}', "bad_payload"),
    (b'{"id":"bad2","prompt":"hi","surprise":1}', "bad_payload"),
    (b'{"id":"bad3","prompt":"' + b"x" * 300_000 + b'"}', "too_large"),
    (b'{"id":"bad4","prompt":"hi","max_tokens":8000}', "too_large"),
])
def test_bad_requests_get_a_final_error_and_a_report(llama: Running, errors: queue.Queue, payload, code) -> None:
    request_id = payload.split(b'"')[3].decode()
    inbox: queue.Queue = queue.Queue()
    name = topics.RESPONSES.build(llama.cluster.cluster, request=request_id)
    llama.client.subscribe(topics.RESPONSES, name, lambda _t, value, _r: inbox.put(value), wait=10)
    llama.client.publish_raw(topics.REQUESTS.build(llama.cluster.cluster), payload, qos=1)
    final = inbox.get(timeout=20)
    llama.client.unsubscribe(name)
    assert isinstance(final, GenerateResult) and final.stop_reason == "error" and final.error
    assert next_report(errors, ref=request_id).code == code


def test_the_pipeline_still_serves_after_bad_input(llama: Running, reference) -> None:
    assert llama.generate(PROMPTS[4]).tokens == reference(llama.art, PROMPTS[4], 24)

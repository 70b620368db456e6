"""Export a recorded trace: Chrome/Perfetto trace-event JSON and a PNG Gantt chart.

Perfetto (https://ui.perfetto.dev, or chrome://tracing) shows one process, the cluster,
with one track per node and a few "head" tracks:
- per node, one complete slice (``ph: "X"``) per piece-run, i.e. per hop's compute,
  named ``pieces {first}-{last} {session}/{step}``, its figures in ``args``;
- per step, a slice on a head track from the input seen on `act/0` to the token seen on
  `sessions/{s}/out` (steps of different sessions overlap, so they get lanes);
- flow arrows (``ph: "s"`` / ``ph: "f"``, ``bp: "e"``, one id per arrow) along each step:
  head -> first node -> ... -> tail -> head; an arrow's span is transfer plus queue;
- an instant event (``ph: "i"``) per plan message (epoch change).
Timestamps are microseconds from the trace's first event, every node on the tracer's
clock. On a node track, slices never overlap: a slice that would start before the
previous one ended (a clock estimate that moved) starts at its end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from linguamq.tools.trace.model import StepTiming, TraceError, TraceModel
from linguamq.tools.trace.records import load

PID = 1
HEAD_TID = 1000  # head lanes: HEAD_TID, HEAD_TID + 1, ...
_EPS_US = 0.5  # flow points sit this far inside their slice


def perfetto(model: TraceModel) -> dict[str, Any]:
    """The trace-event document of ``model``."""
    timings = [t for t in model.timings() if t.hops]
    nodes = list(dict.fromkeys([*model.nodes(), *(h.node for t in timings for h in t.hops)]))
    tids = {node: i + 1 for i, node in enumerate(nodes)}
    t0 = min([model.first_t or 0.0, *(t.trace.t_in for t in timings if t.trace.t_in is not None),
              *(h.t_recv for t in timings for h in t.hops)]) if timings else (model.first_t or 0.0)

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 3)

    events: list[dict[str, Any]] = [_meta("process_name", 0, f"linguamq {model.meta.get('cluster', '')}".strip())]
    for node, tid in tids.items():
        events += [_meta("thread_name", tid, node), _meta("thread_sort_index", tid, tid, key="sort_index")]
    node_slices = _node_slices(timings, tids, us)
    head_slices, lanes = _head_slices(timings, us)
    for lane in range(lanes):
        events += [_meta("thread_name", HEAD_TID + lane, f"head (steps) {lane + 1}"),
                   _meta("thread_sort_index", HEAD_TID + lane, HEAD_TID + lane, key="sort_index")]
    for (i, j), (tid, start, end) in sorted(node_slices.items()):
        events.append(_hop_slice(timings[i], j, tid, start, end))
    for i, (tid, start, end) in sorted(head_slices.items()):
        events.append(_step_slice(timings[i], tid, start, end))
    events += _flows(timings, node_slices, head_slices)
    events += [{"name": f"epoch {p.epoch}", "cat": "plan", "ph": "i", "s": "g", "ts": max(0.0, us(t)), "pid": PID,
                "tid": 0, "args": {"stages": " ".join(f"{s.node}:{s.first}-{s.last}" for s in p.stages),
                                   "reason": p.reason}} for t, p in model.plans]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"cluster": str(model.meta.get("cluster", "")), "t0_unix_s": t0,
                          "clock": "tracer wall clock; nodes aligned by NTP-style pings"}}


def _meta(name: str, tid: int, value: Any, *, key: str = "name") -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": PID, "tid": tid, "args": {key: value}}


def _node_slices(timings: list[StepTiming], tids: dict[str, int], us) -> dict[tuple[int, int], tuple[int, float, float]]:
    """(step index, hop index) -> (tid, start us, end us), never overlapping on a track."""
    by_tid: dict[int, list[tuple[float, float, int, int]]] = {}
    for i, timing in enumerate(timings):
        for j, h in enumerate(timing.hops):
            by_tid.setdefault(tids[h.node], []).append((us(h.t_start), us(h.t_end), i, j))
    out = {}
    for tid, slices in by_tid.items():
        prev_end = 0.0
        for start, end, i, j in sorted(slices):
            start = max(start, prev_end)
            end = max(end, start + 2 * _EPS_US)
            out[(i, j)] = (tid, start, end)
            prev_end = end
    return out


def _head_slices(timings: list[StepTiming], us) -> tuple[dict[int, tuple[int, float, float]], int]:
    """step index -> (tid, start, end) on the first free head lane; and the number of lanes."""
    spans = sorted((us(t.trace.t_in), us(t.trace.t_out), i) for i, t in enumerate(timings) if t.trace.t_in is not None)
    lane_end: list[float] = []
    out = {}
    for start, end, i in spans:
        end = max(end, start + 2 * _EPS_US)
        lane = next((k for k, e in enumerate(lane_end) if e <= start), len(lane_end))
        if lane == len(lane_end):
            lane_end.append(end)
        lane_end[lane] = end
        out[i] = (HEAD_TID + lane, start, end)
    return out, len(lane_end)


def _hop_slice(timing: StepTiming, j: int, tid: int, start: float, end: float) -> dict[str, Any]:
    h, t = timing.hops[j], timing.trace
    return {"name": f"pieces {h.first}-{h.last} {t.session}/{t.step}", "cat": "compute", "ph": "X",
            "ts": start, "dur": round(end - start, 3), "pid": PID, "tid": tid,
            "args": {"node": h.node, "session": t.session, "step": t.step, "epoch": t.epoch,
                     "queue_ms": round(h.queue_ms, 3), "compute_ms": round(h.compute_ms, 3),
                     "send_ms": round(h.send_ms, 3),
                     "transfer_ms": None if h.transfer_ms is None else round(h.transfer_ms, 3)}}


def _step_slice(timing: StepTiming, tid: int, start: float, end: float) -> dict[str, Any]:
    t = timing.trace
    return {"name": f"{t.session}/{t.step}", "cat": "step", "ph": "X", "ts": start, "dur": round(end - start, 3),
            "pid": PID, "tid": tid,
            "args": {"session": t.session, "step": t.step, "epoch": t.epoch, "tokens_in": t.tokens_in,
                     "token": t.token, "pipeline_ms": round(timing.pipeline_ms, 3),
                     "head_to_first_ms": None if timing.head_to_first_ms is None else round(timing.head_to_first_ms, 3),
                     "head_ms": None if timing.head_ms is None else round(timing.head_ms, 3)}}


def _flows(timings: list[StepTiming], node_slices: dict, head_slices: dict) -> list[dict[str, Any]]:
    """One arrow per hop: head -> first node -> ... -> tail -> head."""
    events, flow_id = [], 0
    for i, timing in enumerate(timings):
        chain = [node_slices[(i, j)] for j in range(len(timing.hops))]
        if i in head_slices:
            chain = [head_slices[i], *chain, head_slices[i]]
        for k in range(len(chain) - 1):
            (src_tid, src_start, src_end), (dst_tid, dst_start, dst_end) = chain[k], chain[k + 1]
            from_head, to_head = i in head_slices and k == 0, i in head_slices and k == len(chain) - 2
            src_ts = src_start + _EPS_US if from_head else src_end - _EPS_US
            dst_ts = dst_end - _EPS_US if to_head else dst_start + _EPS_US
            flow_id += 1
            common = {"name": "transfer", "cat": "flow", "id": flow_id, "pid": PID}
            events += [{**common, "ph": "s", "ts": round(src_ts, 3), "tid": src_tid},
                       {**common, "ph": "f", "bp": "e", "ts": round(dst_ts, 3), "tid": dst_tid}]
    return events


def write_perfetto(model: TraceModel, path: Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(perfetto(model), separators=(",", ":")), encoding="utf-8")
    return Path(path)


def write_png(model: TraceModel, path: Path, *, title: str | None = None, max_steps: int = 120) -> Path:
    """A Gantt chart: one row per node, a bar per piece-run (colour: session), queue waits
    as thin pale bars, transfers as grey lines, the head's turnarounds on the head row;
    x in ms from the first step drawn. Only the latest ``max_steps`` steps are drawn (a
    longer trace is a grey wall at this size: Perfetto zooms). Agg canvas, no pyplot."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise TraceError("the PNG export needs matplotlib: pip install 'linguamq[viz]'") from exc
    timings = [t for t in model.timings() if t.hops]
    if not timings:
        raise TraceError("the trace holds no step with hops: nothing to draw")
    total, timings = len(timings), sorted(timings, key=lambda t: t.trace.t_out)[-max_steps:]
    nodes = list(dict.fromkeys([*model.nodes(), *(h.node for t in timings for h in t.hops)]))
    row = {node: len(nodes) - k for k, node in enumerate(nodes)}  # first stage at the top
    t0 = min(t.trace.t_in if t.trace.t_in is not None else t.hops[0].t_recv for t in timings)
    bars, queues, lines, sessions = _gantt(timings, row, t0)
    fig = Figure(figsize=(12, 1.2 + 0.7 * (len(nodes) + 1)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = colormaps["tab10"]
    for (y, c), spans in queues.items():  # one collection per row and colour: fast with many steps
        ax.broken_barh(spans, (y - 0.38, 0.12), facecolors=colours(c), alpha=0.3)
    for (y, c), spans in bars.items():
        ax.broken_barh(spans, (y - 0.25, 0.5), facecolors=colours(c), edgecolor="black", linewidth=0.3)
    ax.add_collection(LineCollection(lines, colors="grey", linewidths=0.5))
    ax.set_yticks([0, *row.values()], ["head", *row.keys()])
    ax.set_xlabel("ms (tracer clock; nodes aligned)")
    shown = f"latest {len(timings)} of {total}" if total > len(timings) else f"{total}"
    ax.set_title(title or f"linguamq trace: {shown} steps, {sessions} session(s)")
    ax.grid(axis="x", linewidth=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return Path(path)


def _gantt(timings: list[StepTiming], row: dict[str, int], t0: float):
    """Bars and queue waits as {(row, colour): [(x, width)]} in ms, transfer segments, sessions."""
    def ms(t: float) -> float:
        return (t - t0) * 1e3

    sessions: dict[str, int] = {}
    bars: dict[tuple[int, int], list[tuple[float, float]]] = {}
    queues: dict[tuple[int, int], list[tuple[float, float]]] = {}
    lines: list[list[tuple[float, float]]] = []
    for t in timings:
        c = sessions.setdefault(t.trace.session, len(sessions)) % 10
        tr = t.trace
        if tr.t_in is not None and tr.t_prev_out is not None:  # the head's turnaround
            bars.setdefault((0, c), []).append((ms(tr.t_prev_out), (tr.t_in - tr.t_prev_out) * 1e3))
        points = [(tr.t_in, 0)] if tr.t_in is not None else []
        for h in t.hops:
            y = row[h.node]
            queues.setdefault((y, c), []).append((ms(h.t_recv), max(h.t_start - h.t_recv, 0) * 1e3))
            bars.setdefault((y, c), []).append((ms(h.t_start), max(h.t_end - h.t_start, 1e-6) * 1e3))
            points += [(h.t_recv, y), (h.t_send, y)]
        points.append((tr.t_out, 0))
        pairs = zip(points[0::2], points[1::2]) if tr.t_in is not None else zip(points[1::2], points[2::2])
        lines += [[(ms(xa), ya), (ms(xb), yb)] for (xa, ya), (xb, yb) in pairs]
    return bars, queues, lines, len(sessions)


def export(record: Path, *, perfetto_out: Path | None = None, png_out: Path | None = None,
           request: str | None = None) -> TraceModel:
    """Read a recorded trace and write the files asked for; returns the model."""
    model = load(record, request=request)
    if perfetto_out is not None:
        write_perfetto(model, perfetto_out)
    if png_out is not None:
        write_png(model, png_out)
    return model

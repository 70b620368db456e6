"""The live text view of `linguamq trace`: a table redrawn every second on a terminal,
plain appended lines otherwise (a pipe, a file, a CI log)."""

from __future__ import annotations

import time
from typing import TextIO

from linguamq.tools.trace.model import NodeStats, TraceModel

CLEAR = "\x1b[H\x1b[2J"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def node_table(stats: list[NodeStats], window_s: float) -> list[str]:
    head = (f"{'node':<12} {'pieces':<9} {'busy%':>6} {'ms/step':>8} {'msg/s':>7} {'queue':>5} {'errors':>6} "
            f"{'rejected':>8} {'ewma ms':>8} {'offset ms':>9} {'rtt ms':>7}")
    rows = [f"{s.node[:12]:<12} {s.pieces[:9]:<9} {s.busy_pct:6.1f} {_num(s.ms_per_step, '8.2f')} "
            f"{s.msgs_per_s:7.1f} {_num(s.queue_depth, '5d')} {s.errors:6d} {_num(s.rejected, '8d')} "
            f"{_num(s.ewma_ms, '8.2f')} {_num(s.offset_ms, '9.2f')} {_num(s.rtt_ms, '7.2f')}" for s in stats]
    return [f"nodes (last {window_s:.0f} s)", head, *rows]


def render(model: TraceModel, now: float | None = None, *, steps: int = 12) -> str:
    """The whole screen: epochs, the per-node table, the latest steps hop by hop."""
    lines = [f"linguamq trace  cluster {model.meta.get('cluster', '?')}"
             + (f"  request {model.request}" if model.request else "")
             + f"  steps seen {model.step_count}", ""]
    lines += model.epochs()[-5:] or ["(no plan seen yet)"]
    lines += ["", *node_table(model.node_stats(now), model.window_s), "",
              ("latest steps, ms: head turnaround | head>first transfer (the ring: tail lead | tail>first) |"
               " node[pieces] q(ueue) c(ompute) | >transfer ... = time since the previous token")]
    lines += [t.describe() for t in model.timings(last=steps)] or ["(no step seen yet)"]
    errors = list(model.errors)[-3:]
    if errors:
        lines += ["", "latest errors:"] + [f"  {e.reporter} {e.code} {e.ref or ''}: {e.message[:100]}"
                                           for _, e in errors]
    return "\n".join(lines) + "\n"


class LiveView:
    """Call ``tick()`` about once a second."""

    def __init__(self, model: TraceModel, *, out: TextIO, tty: bool, steps: int = 12) -> None:
        self.model, self.out, self.tty, self.steps = model, out, tty, steps
        self._printed_steps = 0
        self._printed_epochs = 0
        self._printed_errors = 0

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.tty:
            self.out.write(CLEAR + render(self.model, now, steps=self.steps))
        else:
            self.out.write("".join(line + "\n" for line in self._new_lines(now)))
        self.out.flush()

    def _new_lines(self, now: float) -> list[str]:
        m = self.model
        epochs = m.epochs()
        lines = epochs[self._printed_epochs:]
        self._printed_epochs = len(epochs)
        new = m.step_count - self._printed_steps
        self._printed_steps = m.step_count
        if new > 0:
            lines += [f"step {t.describe()}" for t in m.timings(last=min(new, len(m.steps)))]
            lines += [f"node {s.node} pieces {s.pieces} busy {s.busy_pct:.1f}% ms/step {_num(s.ms_per_step, '.2f')} "
                      f"msg/s {s.msgs_per_s:.1f} queue {_num(s.queue_depth, 'd')} errors {s.errors} "
                      f"offset {_num(s.offset_ms, '.2f')} ms" for s in m.node_stats(now)]
        new = m.error_count - self._printed_errors
        self._printed_errors = m.error_count
        if new > 0:
            lines += [f"error {e.reporter} {e.code} {e.ref or ''}: {e.message[:200]}"
                      for _, e in list(m.errors)[-new:]]
        return lines

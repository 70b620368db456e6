"""`linguamq trace`: follow requests across the pipeline, on one clock.

Three parts, each usable alone:

- ``ClockEstimator`` / ``Aligner``: NTP-style clock offsets of the nodes relative to the
  tracer (``offset = node clock - tracer clock``), from ClockPing/ClockPong exchanges;
  per node the sample with the least round trip among the last ``window`` is kept.
- ``TraceModel``: events in, figures out (per step and hop, per node, per epoch). The
  same model serves the live view and a replay of a recorded file.
- ``Tracer``: an MQTT observer that feeds a model and, optionally, a JSONL record.

The observer stands in for the head: it subscribes to `act/0` (the head's step inputs)
and `sessions/+/out` (the tail's outputs) as the head does, so "seen by the tracer" is
"seen by the head" up to one broker fan-out. All times below are the tracer's wall
clock; node timestamps are moved onto it by their estimated offset.

With the ring (hub default) the tail sends step k to the first node itself, before token
k-1 goes to the head: on act/0 the tracer then sees the tail's envelope, ``head_ms`` is
the tail's lead (negative: the step left before its token) and ``head->first`` is the
transfer tail -> first node; a step whose input is the tail's (``StepTrace.ring``) shows
them as ``tail`` and ``tail>``. The sum is the same cycle. Steps the head sends (prompts,
retries, hub --no-ring) keep the head's labels.

Accounting of one decode step k of a session (``StepTiming``): a token goes round the
ring head -> n1 -> ... -> tail -> head, and every part of that round has a figure:
    head_ms       = t_in(k) - t_out(k-1): the head's turnaround, from token k-1 arriving
                    to the input of step k leaving (its work plus a broker fan-out)
    head->first   = first hop's t_recv - t_in(k)              (transfer head -> first node)
    per hop i     = queue (t_start - t_recv) + compute (t_end - t_start; the tail's
                    sampling included) + send (t_send - t_end, ~0: the hop is stamped
                    just before the output is encoded and published)
    transfer i    = hop i+1's t_recv - hop i's t_send          (tail: t_out(k) - t_send)
    pipeline_ms   = head->first + sum over hops (queue + compute + send + transfer)
    cycle_ms      = head_ms + pipeline_ms   (= t_out(k) - t_out(k-1))
"The measured ms/token" is the head's own figure, GenerateResult.ms_per_token, taken on
the head's clock: (T(n-1) - T(0)) / (n-1), T(k) being step k's output arriving at the
head, i.e. the mean of T(k) - T(k-1) over the decode steps k = 1..n-1. The mean of
``cycle_ms`` over the same steps, summed from the per-hop figures, must match it within
10% (tests assert it on a recorded 3-node generation). Offsets cancel in the sums but
not in the parts: a wrong offset shows as a negative transfer on one side of a node and
an inflated one on the other (tests inject a 7.5 s skew and check every part). The
tracer's own receive times stand in for the head's: a busy tracer sees act/0 late, which
moves time from head_ms to head->first (seen as a negative head->first of a few ms).

Record format (``--record FILE.jsonl``): one JSON object per line, ``{"kind": ..., "t":
tracer wall clock, ...}`` with kind ``meta``, ``clock`` (node, offset_s, rtt_s, samples),
``input`` / ``step`` (``msg``: the envelope header; ``step`` adds ``token``),
``telemetry``, ``plan``, ``error``, ``result`` (``msg``: the message as on the wire).
"""

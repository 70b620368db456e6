"""Scenario files: a model and a set of devices, for offline planning (`linguamq plan`).

A scenario is a JSON object, parsed strictly (unknown, missing, mistyped or out-of-range
fields are errors that name the field, as for every wire type)::

    {
      "manifest": "tinyllama/manifest.json",     # relative to the scenario file, or
      "pieces": [{"name": "layer", "count": 22, "bytes": ..., "flops_per_token": ...,
                  "attn_flops_per_position": ..., "act_bytes_per_token": ...,
                  "kv_bytes_per_token": ...}, ...],
      "devices": [{"name": "phone-a", "ms_per_gflop": 25, "prefill_ms_per_gflop": 8,
                   "mem_mb": 3072, "uplink_mbps": 40, "downlink_mbps": 80, "rtt_ms": 12}],
      "max_context": 2048, "max_sessions": 1
    }

Exactly one of ``manifest`` and ``pieces``. ``max_context`` defaults to the manifest's
(2048 with inline pieces); ``mem_mb`` 0 means no limit. ``"type": "scenario"`` and
``"v": 1`` may be left out.
"""

from __future__ import annotations

from pathlib import Path

from linguamq.planner.cost import CostSettings, Device, PieceCost, Problem, pieces_of
from linguamq.planner.errors import ScenarioError
from linguamq.schemas.cluster import Profile
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.wire import ID_PATTERN, Message, Struct, spec, struct

INLINE_MAX_CONTEXT = 2048
MAX_PIECES = 1024  # in all, counts included: the MILP is sized for a few hundred


@struct
class ScenarioPiece(Struct):
    name: str = spec(max_len=64, default="")
    count: int = spec(ge=1, le=MAX_PIECES, default=1, doc="this many identical pieces in a row")
    bytes: int = spec(ge=0)
    flops_per_token: int = spec(ge=0)
    attn_flops_per_position: int = spec(ge=0, default=0)
    act_bytes_per_token: int = spec(ge=0)
    kv_bytes_per_token: int = spec(ge=0, default=0)


@struct
class ScenarioDevice(Struct):
    name: str = spec(pattern=ID_PATTERN)
    ms_per_gflop: float = spec(gt=0, doc="decode")
    prefill_ms_per_gflop: float | None = spec(gt=0, default=None, doc="default: ms_per_gflop")
    mem_mb: float = spec(ge=0, doc="memory budget in MB (2**20 bytes); 0: no limit")
    uplink_mbps: float = spec(gt=0)
    downlink_mbps: float = spec(gt=0)
    rtt_ms: float = spec(ge=0, doc="round trip to the broker")

    def profile(self) -> Profile:
        prefill = self.ms_per_gflop if self.prefill_ms_per_gflop is None else self.prefill_ms_per_gflop
        return Profile(ms_per_gflop_decode=self.ms_per_gflop, ms_per_gflop_prefill=prefill,
                       mem_budget_mb=self.mem_mb, rtt_ms=self.rtt_ms, uplink_mbps=self.uplink_mbps,
                       downlink_mbps=self.downlink_mbps)


@struct
class Scenario(Message):
    TYPE = "scenario"
    TAG_OPTIONAL = True

    manifest: str | None = spec(max_len=1024, default=None, doc="manifest path, relative to the scenario")
    pieces: tuple[ScenarioPiece, ...] = spec(max_len=MAX_PIECES, default=())
    devices: tuple[ScenarioDevice, ...] = spec(max_len=1024)
    max_context: int | None = spec(ge=1, le=1 << 24, default=None)
    max_sessions: int = spec(ge=1, le=4096, default=1)
    context: int | None = spec(ge=0, le=1 << 24, default=None, doc="positions a decode step attends to")
    overhead_mb: float = spec(ge=0, default=200.0, doc="runtime memory per node that takes part")
    overhead_factor: float = spec(ge=1, le=10, default=1.3, doc="runtime memory per weight byte")

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        if (self.manifest is None) == (not self.pieces):
            raise SchemaError("give either a manifest path or inline pieces, not both or neither", field="manifest")
        if sum(p.count for p in self.pieces) > MAX_PIECES:
            raise SchemaError(f"{sum(p.count for p in self.pieces)} pieces in all, at most {MAX_PIECES}",
                              field="pieces")
        seen: set[str] = set()
        for i, device in enumerate(self.devices):
            if device.name in seen:
                raise SchemaError(f"device name {device.name!r} appears twice", field=f"devices[{i}].name")
            seen.add(device.name)


def load(path: str | Path) -> Problem:
    """The Problem a scenario file describes; ScenarioError names the file and the field."""
    path = Path(path)
    try:
        scenario = Scenario.from_json(_read(path))
    except SchemaError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    return problem_of(scenario, base=path.parent)


def problem_of(scenario: Scenario, *, base: Path) -> Problem:
    if scenario.manifest is not None:
        manifest = _manifest(base / scenario.manifest)
        pieces, max_context = pieces_of(manifest), manifest.max_context
    else:
        pieces, max_context = _inline(scenario.pieces), INLINE_MAX_CONTEXT
    settings = CostSettings(max_context=scenario.max_context or max_context, max_sessions=scenario.max_sessions,
                            context=scenario.context, overhead_factor=scenario.overhead_factor,
                            overhead_mb=scenario.overhead_mb)
    devices = tuple(Device(name=d.name, profile=d.profile()) for d in scenario.devices)
    return Problem(pieces=pieces, devices=devices, settings=settings)


def _inline(pieces: tuple[ScenarioPiece, ...]) -> tuple[PieceCost, ...]:
    return tuple(PieceCost(name=p.name if p.count == 1 else f"{p.name}.{i}", bytes=p.bytes,
                           flops_per_token=p.flops_per_token, attn_flops_per_position=p.attn_flops_per_position,
                           act_bytes_per_token=p.act_bytes_per_token, kv_bytes_per_token=p.kv_bytes_per_token)
                 for p in pieces for i in range(p.count))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _manifest(path: Path) -> ModelManifest:
    try:
        return ModelManifest.from_json(_read(path))
    except SchemaError as exc:
        raise ScenarioError(f"manifest {path}: {exc}") from exc


"""Segment runtime: a contiguous run of model pieces in ONNX Runtime, with a KV cache.

A segment is pieces `first..last` of a manifest (embed = 0, layer i = i + 1, head =
last). `run(session, inputs, positions)` feeds token ids (if the segment starts with
`embed`) or hidden states through every piece in order and returns hidden states, or
float32 logits of the last position if the segment ends with `head`. Each layer piece
reads and replaces the session's cached key/value arrays, or (rotary families) writes its
new positions into the session's KV buffers in place. The in-place layers of a segment run
as one graph where the `onnx` package is at hand to merge them (node/merge.py).

Positions are absolute and must continue the session's cache: a step for a session
whose layers hold P positions carries positions P..P+T-1. If a piece fails the session's
cache is dropped, since some layers would already have advanced; the head re-prefills.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import structlog
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from linguamq.node import merge
from linguamq.node.errors import ArtifactError, ContextOverflowError, InferenceError, RuntimeInputError
from linguamq.node.kvcache import FIRST_CAPACITY, KVCache
from linguamq.schemas.manifest import ModelManifest, PieceSpec, file_sha256

# The piece interface written by `linguamq export` (inputs, outputs), by kind.
PIECE_IO = {
    "embed": (("input_ids",), ("hidden",)),
    "layer": (("hidden", "position_ids", "past_key", "past_value"), ("hidden_out", "present_key", "present_value")),
    "head": (("hidden",), ("logits",)),
}
# Layers of rotary families: the KV cache is a buffer the layer writes in place (GroupQueryAttention).
IN_PLACE_IO = (("hidden", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"),
               ("hidden_out", "present_key", "present_value"))
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
MERGED_DIR = "merged"  # beside the pieces: their layers merged into one graph (node/merge.py)
# ONNX Runtime's exceptions; `run_with_iobinding` raises a plain RuntimeError ("Error in execution").
ORT_ERRORS = (Fail, InvalidArgument, RuntimeException, RuntimeError)
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    intra_op_threads: int = 0  # 0: ONNX Runtime picks (one per physical core)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # Spinning workers help one session, but every piece has its own pool: with spinning
    # on, idle pools of the other pieces steal the cores (measured 12x slower decode).
    allow_spinning: bool = False
    verify_sha256: bool = True
    merge_layers: bool = True  # a segment's in-place layers as one graph, when `onnx` is importable
    merge_dir: Path | None = None  # where merged layers are written; None: `merged/` beside the pieces


log = structlog.get_logger()


@dataclasses.dataclass(frozen=True)
class LoadedPiece:
    spec: PieceSpec
    session: ort.InferenceSession

    @functools.cached_property
    def in_place(self) -> bool:
        """A layer that writes its KV buffer in place."""
        return self.spec.kind == "layer" and self.session.get_inputs()[-1].name == IN_PLACE_IO[0][-1]


@dataclasses.dataclass(frozen=True)
class MergedLayers:
    """Consecutive in-place layers merged into one graph (node/merge.py), run by one call."""
    specs: tuple[PieceSpec, ...]
    session: ort.InferenceSession
    file: Path

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.index - 1 for s in self.specs)


Loaded = LoadedPiece | MergedLayers


@dataclasses.dataclass(frozen=True)
class _Rows:
    """The pool rows a step runs: slots lo..hi-1, the step's sessions at rows ``index`` of
    that span, and every row's seqlens_k (the position it writes)."""
    lo: int
    hi: int
    index: np.ndarray
    seqlens: np.ndarray


class SegmentRuntime:
    """Pieces `first..last` (inclusive) of `manifest`, loaded from `artifact_dir`."""

    def __init__(self, *, manifest: ModelManifest, artifact_dir: Path | str, first: int, last: int,
                 settings: RuntimeSettings = RuntimeSettings(), cache: KVCache | None = None,
                 reuse: Iterable[Loaded] = ()) -> None:
        """``reuse``: pieces another runtime already loaded (same file, same settings);
        those of this segment are shared, not loaded again (a node keeping pieces across a
        new assignment: loading is most of a failover). Merged layers are shared only for the
        same run of layers: a segment that grew or shrank merges again."""
        if not 0 <= first <= last < len(manifest.pieces):
            raise ArtifactError(f"segment {first}..{last} is outside pieces 0..{len(manifest.pieces) - 1}")
        self.manifest = manifest
        self.cache = cache if cache is not None else KVCache()
        self._act_dtype = NP_DTYPES[manifest.act_dtype]
        self._units = _load_units(Path(artifact_dir), manifest, manifest.pieces[first:last + 1], settings, reuse)
        self._layers = [s.index - 1 for s in self.pieces if s.kind == "layer"]
        if any(isinstance(u, MergedLayers) or u.in_place for u in self._units) and not manifest.rope_inv_freq:
            raise ArtifactError("the manifest has no rope_inv_freq, which its in-place layers need")
        self._rotary = (np.zeros((0, 0), np.float32),) * 2  # cos, sin by position: grown on demand
        self._bindings: dict[int, ort.IOBinding] = {}  # in-place layers' bindings, by first piece index
        self._log = log.bind(pieces=f"{first}..{last}", model=manifest.name)
        self._log.debug("segment loaded", bytes=sum(s.bytes for s in self.pieces),
                        calls_per_step=len(self._units))

    @property
    def pieces(self) -> tuple[PieceSpec, ...]:
        return tuple(s for u in self._units for s in _specs(u))

    @property
    def loaded(self) -> tuple[Loaded, ...]:
        """What ONNX Runtime holds: pieces, and runs of layers merged (one session call each)."""
        return self._units

    @property
    def merged_file(self) -> Path | None:
        return next((u.file for u in self._units if isinstance(u, MergedLayers)), None)

    @property
    def takes_ids(self) -> bool:
        return self.pieces[0].kind == "embed"

    @property
    def gives_logits(self) -> bool:
        return self.pieces[-1].kind == "head"

    @property
    def holds_kv(self) -> bool:
        """True if the segment has layers, and so a per-session position to follow."""
        return bool(self._layers)

    def context_length(self, session: str) -> int:
        """Positions this segment holds for `session` (0 without layers or cache)."""
        return self.cache.length(session, self._layers[0]) if self._layers else 0

    def drop(self, session: str) -> None:
        self.cache.drop(session)

    @functools.cached_property
    def batches(self) -> bool:
        """Decode steps of several sessions run as one call (`run_batch`): the export's pieces
        compute each row of a batch as alone, and every layer here writes its cache in place."""
        return self.manifest.batch_rows and all(
            isinstance(u, MergedLayers) or u.in_place or u.spec.kind != "layer" for u in self._units)

    def run(self, session: str, inputs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids (1, T) int64 or hidden (1, T, H) -> hidden (1, T, H) or logits (1, V) float32."""
        x: np.ndarray | ort.OrtValue = self._check_inputs(inputs)
        pos = self._check_positions(session, positions, x.shape[1])
        total = int(pos[0, -1]) + 1
        try:
            rows = self._reserve((session,), np.array([total]))
            for unit in self._units:
                x = self._run_unit(unit, (session,), rows, x, pos)
        except ORT_ERRORS as exc:
            self.cache.drop(session)
            raise InferenceError(f"session {session}: ONNX Runtime failed: {str(exc).splitlines()[0]}") from exc
        return _array(x)

    def run_batch(self, sessions: tuple[str, ...], inputs: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decode step of each of ``sessions`` (distinct, each at the position its cache
        holds: ``positions``, (B,)) as one call per unit: ids (B, 1) int64 or hidden (B, 1, H)
        -> hidden (B, 1, H) or logits (B, V) float32, row b that of ``sessions[b]``, equal to
        `run` of each.

        The cache gives every session a row of its pools; a batch runs the rows from the
        lowest of its sessions' to the highest, those of other sessions with dummy inputs
        (their outputs dropped, their caches unchanged). Needs ``batches``."""
        if not self.batches:
            raise RuntimeInputError("this segment cannot batch: its export computes a batch's rows together "
                                    "(--quantize int8) or its layers concatenate their cache")
        if len(set(sessions)) != len(sessions) or not sessions:
            raise RuntimeInputError(f"a batch needs distinct sessions, got {list(sessions)}")
        x = self._check_inputs(inputs, rows=len(sessions))
        if x.shape[1] != 1:
            raise RuntimeInputError(f"a batch is of decode steps, one position each; got {x.shape[1]}")
        held = np.array([self.context_length(s) for s in sessions], np.int64)
        wanted = np.asarray(positions).reshape(-1)
        if wanted.shape != held.shape or (self._layers and np.any(wanted != held)):
            raise RuntimeInputError(f"positions {wanted.tolist()} do not follow the sessions' caches "
                                    f"({held.tolist()})")
        if held.max() + 1 > self.manifest.max_context:
            raise ContextOverflowError(f"position {int(held.max())} is past max_context {self.manifest.max_context}")
        try:
            rows = self._reserve(sessions, held + 1)
            span = np.zeros((rows.hi - rows.lo, *x.shape[1:]), x.dtype)  # rows of other sessions: dummies
            span[rows.index] = x
            out: np.ndarray | ort.OrtValue = span
            for unit in self._units:
                out = self._run_unit(unit, sessions, rows, out, held[:, None])
        except ORT_ERRORS as exc:
            for session in sessions:
                self.cache.drop(session)
            raise InferenceError(f"a batch of {len(sessions)} sessions: ONNX Runtime failed: "
                                 f"{str(exc).splitlines()[0]}") from exc
        return _array(out)[rows.index]

    def _reserve(self, sessions: tuple[str, ...], totals: np.ndarray) -> _Rows:
        """Room for ``totals`` positions of each session in every in-place layer, reserved
        at once before any unit runs (a unit's reservation may move other sessions' rows)."""
        layers = [s.index - 1 for u in self._units for s in _specs(u) if isinstance(u, MergedLayers) or u.in_place]
        if not layers:
            return _Rows(lo=0, hi=len(sessions), index=np.arange(len(sessions)), seqlens=totals - 1)
        m = self.manifest
        self.cache.reserve_rows(sessions, layers, tuple(int(t) for t in totals), (1, m.num_kv_heads, 1, m.head_dim),
                                self._act_dtype, most=m.max_context)
        slots = np.array([self.cache.slot(s) for s in sessions])
        lo, _, held = self.cache.rows(sessions, layers[0])
        seqlens = held.copy()  # other rows: their next position, written and discarded
        seqlens[slots - lo] = totals - 1
        return _Rows(lo=lo, hi=lo + len(held), index=slots - lo, seqlens=seqlens)

    def _run_unit(self, piece: Loaded, sessions: tuple[str, ...], rows: _Rows, x: np.ndarray | ort.OrtValue,
                  pos: np.ndarray) -> np.ndarray | ort.OrtValue:
        if isinstance(piece, MergedLayers):
            return self._run_in_place(piece.session, piece.specs, sessions, rows, x, merged=True)
        if piece.in_place:  # hidden states stay in ONNX Runtime from one in-place layer to the next
            return self._run_in_place(piece.session, (piece.spec,), sessions, rows, x, merged=False)
        session = sessions[0]  # the concatenated layout runs one session a call
        x = _array(x)
        kind = piece.spec.kind
        if kind == "embed":
            return piece.session.run(None, {"input_ids": x})[0]  # (1, T, H)
        if kind == "head":
            return piece.session.run(None, {"hidden": x})[0]  # (1, V)
        layer = piece.spec.index - 1
        past = self.cache.get(session, layer) or (self._empty_kv(),) * 2
        hidden, key, value = piece.session.run(
            None, {"hidden": x, "position_ids": pos, "past_key": past[0], "past_value": past[1]})
        self.cache.put(session, layer, key, value)  # (1, kv, P+T, D)
        return hidden  # (1, T, H)

    def _run_in_place(self, ort_session: ort.InferenceSession, specs: tuple[PieceSpec, ...],
                      sessions: tuple[str, ...], rows: _Rows, x: np.ndarray | ort.OrtValue, *,
                      merged: bool) -> ort.OrtValue:
        """Past and present bound to the same buffers, the rows ``rows`` of each layer's pool:
        ONNX Runtime writes the new positions into them and reads the cache where it lies
        (no copy of the cache per step). One binding per piece or merged run, kept: binding
        costs more than a small layer's arithmetic. The sessions' layers are advanced after."""
        buffers = [(s.index - 1, *self.cache.rows(sessions, s.index - 1)[1]) for s in specs]
        total = int(rows.seqlens.max()) + 1
        cos, sin = self._rotary_tables(total)
        binding = self._bindings.get(specs[0].index)
        if binding is None:
            binding = self._bindings[specs[0].index] = ort_session.io_binding()
        binding.bind_output("hidden_out", "cpu")  # again: else the last run's output is taken as preallocated
        if isinstance(x, ort.OrtValue):
            binding.bind_ortvalue_input("hidden", x)
        else:
            binding.bind_cpu_input("hidden", x)
        binding.bind_cpu_input("seqlens_k", rows.seqlens.astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        binding.bind_cpu_input("cos_cache", cos)
        binding.bind_cpu_input("sin_cache", sin)
        for layer, key, value in buffers:
            name = functools.partial(merge.layer_name, layer) if merged else str
            for past, present, buffer in (("past_key", "present_key", key), ("past_value", "present_value", value)):
                binding.bind_input(name(past), "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
                binding.bind_output(name(present), "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
        ort_session.run_with_iobinding(binding)
        for layer, _, _ in buffers:
            for session, seqlen in zip(sessions, rows.seqlens[rows.index]):
                self.cache.advance(session, layer, int(seqlen) + 1)
        out = binding.get_outputs()[0]  # (1, T, H); a reference of its own
        binding.clear_binding_inputs()  # else every layer's activations stay alive until its next run
        binding.clear_binding_outputs()
        return out

    def _rotary_tables(self, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin of position x rope_inv_freq, (rows >= positions, D/2), as the exporter's
        torch computes them (float32 angles); grown by doubling up to max_context + 1 (a batch's dummy
        row of a session holding max_context positions writes one past them)."""
        if self._rotary[0].shape[0] < positions:
            rows = min(max(positions, 2 * self._rotary[0].shape[0], FIRST_CAPACITY), self.manifest.max_context + 1)
            angles = np.arange(rows, dtype=np.float32)[:, None] * np.asarray(self.manifest.rope_inv_freq, np.float32)
            self._rotary = (np.cos(angles).astype(self._act_dtype), np.sin(angles).astype(self._act_dtype))
        return self._rotary

    def _empty_kv(self) -> np.ndarray:
        m = self.manifest
        return np.zeros((1, m.num_kv_heads, 0, m.head_dim), dtype=self._act_dtype)  # (1, kv, 0, D)

    def _check_inputs(self, inputs: np.ndarray, rows: int = 1) -> np.ndarray:
        if self.takes_ids:
            if inputs.ndim != 2 or inputs.shape[0] != rows or inputs.shape[1] < 1:
                raise RuntimeInputError(f"token ids must have shape ({rows}, T>=1), got {inputs.shape}")
            if inputs.dtype.kind not in "iu":
                raise RuntimeInputError(f"token ids must be integers, got {inputs.dtype}")
            if inputs.size and (inputs.min() < 0 or inputs.max() >= self.manifest.vocab_size):
                raise RuntimeInputError(f"token id out of range 0..{self.manifest.vocab_size - 1}")
            return np.ascontiguousarray(inputs, dtype=np.int64)
        hidden = self.manifest.hidden_size
        if inputs.ndim != 3 or inputs.shape[0] != rows or inputs.shape[1] < 1 or inputs.shape[2] != hidden:
            raise RuntimeInputError(f"hidden states must have shape ({rows}, T>=1, {hidden}), got {inputs.shape}")
        if inputs.dtype != self._act_dtype:
            raise RuntimeInputError(f"hidden states must be {self.manifest.act_dtype}, got {inputs.dtype}")
        return np.ascontiguousarray(inputs)

    def _check_positions(self, session: str, positions: np.ndarray, steps: int) -> np.ndarray:
        pos = np.asarray(positions)
        if pos.shape != (1, steps) or pos.dtype.kind not in "iu":
            raise RuntimeInputError(f"positions must be integers of shape (1, {steps}), got {pos.dtype} {pos.shape}")
        held = self.context_length(session)
        if (self._layers and pos[0, 0] != held) or np.any(np.diff(pos[0]) != 1):
            raise RuntimeInputError(f"session {session}: positions must run {held}..{held + steps - 1} "
                                    f"to follow its cache, got {pos[0, 0]}..{pos[0, -1]}")
        if pos[0, -1] >= self.manifest.max_context:
            raise ContextOverflowError(f"session {session}: position {int(pos[0, -1])} is past max_context "
                                       f"{self.manifest.max_context}")
        return np.ascontiguousarray(pos, dtype=np.int64)


def _array(x: np.ndarray | ort.OrtValue) -> np.ndarray:
    return x.numpy() if isinstance(x, ort.OrtValue) else x


def _session_options(settings: RuntimeSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPT_LEVELS[settings.graph_optimization]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    # No per-session arena: each piece's arena kept its own high-water mark for good (a
    # 1,500-token prefill left SmolLM2's 32 sessions holding 3 GB; 0.6 GB without, as fast).
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # errors only: ORT's warnings go to its own logger, not ours
    return options


def _specs(unit: Loaded) -> tuple[PieceSpec, ...]:
    return unit.specs if isinstance(unit, MergedLayers) else (unit.spec,)


def _load_units(artifact_dir: Path, manifest: ModelManifest, specs: tuple[PieceSpec, ...], settings: RuntimeSettings,
                reuse: Iterable[Loaded] = ()) -> tuple[Loaded, ...]:
    """The segment's layers merged into one session where they can be (else one each), its
    other pieces one each, in piece order. What ``reuse`` holds for the same specs is taken as it is."""
    options = _session_options(settings)
    reuse = tuple(reuse)
    layers = tuple(s for s in specs if s.kind == "layer")
    merged = None
    if settings.merge_layers and merge.can_merge(layers):
        merged = next((u for u in reuse if isinstance(u, MergedLayers) and u.specs == layers), None) \
            or _load_merged(artifact_dir, layers, options, settings)
    singles = _load_pieces(artifact_dir, tuple(s for s in specs if merged is None or s not in layers), options,
                           settings.verify_sha256, [u for u in reuse if isinstance(u, LoadedPiece)])
    units: list[Loaded] = [p for p in singles if p.spec.kind == "embed"]
    units += [merged] if merged is not None else [p for p in singles if p.spec.kind == "layer"]
    return (*units, *(p for p in singles if p.spec.kind == "head"))


def _load_pieces(artifact_dir: Path, specs: tuple[PieceSpec, ...], options: ort.SessionOptions, verify: bool,
                 reuse: Iterable[LoadedPiece] = ()) -> tuple[LoadedPiece, ...]:
    """Largest first: a piece's file is briefly resident twice while it loads, and that
    transient costs least while little else is resident (peak RSS -~100 MB at 100M params).
    A piece in ``reuse`` with the same spec (name, index, sha256) is taken as it is."""
    kept = {p.spec: p for p in reuse}
    loaded = {spec.index: kept.get(spec) or _load_piece(artifact_dir, spec, options, verify)
              for spec in sorted(specs, key=lambda p: -p.bytes)}
    return tuple(loaded[spec.index] for spec in specs)


def _load_merged(artifact_dir: Path, layers: tuple[PieceSpec, ...], options: ort.SessionOptions,
                 settings: RuntimeSettings) -> MergedLayers | None:
    """The layers merged and loaded. A merged file that does not load is merged again once;
    if that fails too (no room, no rights, a broken onnx, too little memory), None: the
    caller loads the layers one by one, and the log says why."""
    for spec in layers:  # even when merged before: a piece found tampered with is refused as when run alone
        _check_file(artifact_dir, spec, settings.verify_sha256)
    out_dir = settings.merge_dir or artifact_dir / MERGED_DIR
    name = f"layers {layers[0].index - 1}..{layers[-1].index - 1} merged"
    for attempt in range(2):
        path = out_dir / merge.merged_file(layers)
        try:
            if attempt:
                merge.discard(path)
            path = merge.merge_layers(artifact_dir, layers, out_dir, verify=settings.verify_sha256)
            session = _new_session(path, name, options)
            _check_merged_io(path, layers, session)
            return MergedLayers(specs=layers, session=session, file=path)
        except Exception as exc:  # whatever it was, one call per layer still works
            log.warning("layers not merged" if attempt else "merged layers would not load; merging again",
                        file=path.name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return None


def _check_merged_io(path: Path, layers: tuple[PieceSpec, ...], session: ort.InferenceSession) -> None:
    names = [merge.layer_name(s.index - 1, n) for s in layers for n in merge.PER_LAYER_INPUTS]
    expected = (("hidden", *merge.SHARED_INPUTS, *names),
                ("hidden_out", *(merge.layer_name(s.index - 1, n) for s in layers for n in merge.PER_LAYER_OUTPUTS)))
    got = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
    if sorted(got[0]) != sorted(expected[0]) or sorted(got[1]) != sorted(expected[1]):
        raise ArtifactError(f"merged layers {path.name}: expected inputs {expected[0]} and outputs {expected[1]}, "
                            f"got {got[0]} and {got[1]}")


def _load_piece(artifact_dir: Path, spec: PieceSpec, options: ort.SessionOptions, verify: bool) -> LoadedPiece:
    session = _new_session(_check_file(artifact_dir, spec, verify), f"piece {spec.name}", options)
    _check_io(spec, session)
    return LoadedPiece(spec=spec, session=session)


def _check_file(artifact_dir: Path, spec: PieceSpec, verify: bool) -> Path:
    path = artifact_dir / spec.file
    if not path.is_file():
        raise ArtifactError(f"piece {spec.name}: file {str(path)!r} is missing")
    if verify and file_sha256(path) != spec.sha256:
        raise ArtifactError(f"piece {spec.name}: {spec.file} does not match its sha256 in the manifest")
    return path


def _new_session(path: Path, what: str, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        # From the path, not from bytes: ORT's Python session keeps a model given as bytes
        # alive, which doubles the resident weights.
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind classes; translate them all here
        raise ArtifactError(f"{what}: ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0]}") from exc


def _check_io(spec: PieceSpec, session: ort.InferenceSession) -> None:
    inputs, outputs = PIECE_IO[spec.kind]
    got = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
    if got != (inputs, outputs) and not (spec.kind == "layer" and got == IN_PLACE_IO):
        raise ArtifactError(f"piece {spec.name}: expected inputs {inputs} and outputs {outputs}, got {got[0]} and {got[1]}")

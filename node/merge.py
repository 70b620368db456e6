"""Contiguous in-place layers merged into one ONNX graph: one session call per step for the run.

Each layer piece is its own graph, and each ONNX Runtime call costs about 0.13 ms of
binding, dispatch and planning before any arithmetic; for a small model that is a fifth of
a decode step (SmolLM2-135M int4, 30 layers: 20.6 ms per step at one call per layer, 16.8 merged). A
node therefore merges the layers it runs back to back into one graph when it loads a
segment. Layer ``i``'s names get the prefix ``l{i}_``; what all layers take alike (the
rotary tables, ``seqlens_k``, ``total_sequence_length``) is one input, hidden states flow
from layer to layer inside the graph:

    inputs:  hidden, seqlens_k, total_sequence_length, cos_cache, sin_cache, l{i}_past_key, l{i}_past_value
    outputs: hidden_out, l{i}_present_key, l{i}_present_value

Merging needs the ``onnx`` package, which a node install does not carry (it has no wheel
for Termux): without it a node runs its layers one call each, as before. The merged model
is written to a directory of the runtime's (weights in one external-data file, so any size
saves; a checksum file written last marks it whole) and loaded from there: ONNX Runtime
keeps a model given as bytes alive, which would double the resident weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from linguamq.schemas.manifest import PieceSpec

SHARED_INPUTS = ("seqlens_k", "total_sequence_length", "cos_cache", "sin_cache")
PER_LAYER_INPUTS = ("past_key", "past_value")
PER_LAYER_OUTPUTS = ("present_key", "present_value")
PREFIX = "layers-"  # merged files in a directory are named layers-{first}-{last}-{digest}.onnx
FORMAT = 1  # of the merged graph: part of the digest, so a file merged by an older version is not used


def can_merge(specs: Sequence[PieceSpec]) -> bool:
    """Two or more in-place layers (their last input is the sine table), and `onnx` at hand."""
    return (len(specs) > 1 and all(s.kind == "layer" and s.inputs and s.inputs[-1].name == SHARED_INPUTS[-1]
                                   for s in specs)
            and importlib.util.find_spec("onnx") is not None)


def layer_name(layer: int, name: str) -> str:
    return f"l{layer}_{name}"


def merged_file(specs: Sequence[PieceSpec]) -> str:
    """The file name of these pieces merged: their content and FORMAT decide it, so a stale one never matches."""
    digest = hashlib.sha256(f"{FORMAT}:{''.join(s.sha256 for s in specs)}".encode()).hexdigest()[:16]
    return f"{PREFIX}{specs[0].index - 1}-{specs[-1].index - 1}-{digest}.onnx"


def merge_layers(directory: Path, specs: Sequence[PieceSpec], out_dir: Path, *, verify: bool = True) -> Path:
    """Merge the layer pieces ``specs`` (consecutive, in-place IO) found in ``directory``
    into ``out_dir / merged_file(specs)``; its path. A merged file already there is used if
    it is whole (its checksum file, written last, exists) and, with ``verify``, its bytes
    still match that checksum (a disk may lose or change them as it may a piece's)."""
    out = out_dir / merged_file(specs)
    if _whole(out, verify):
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    import onnx  # optional: see the module's docstring
    from onnx import compose

    merged: onnx.ModelProto | None = None
    previous = "hidden"
    for spec in specs:
        layer = spec.index - 1
        model = compose.add_prefix(onnx.load(str(directory / spec.file)), layer_name(layer, ""))
        renames = {layer_name(layer, "hidden"): previous} | {layer_name(layer, n): n for n in SHARED_INPUTS}
        _rename(model.graph, renames)
        previous = layer_name(layer, "hidden_out")
        if merged is None:
            merged = model
            continue
        graph, taken = merged.graph, {i.name for i in merged.graph.input}
        _drop(graph.output, {renames[layer_name(layer, "hidden")]})  # now consumed inside the graph
        graph.input.extend(i for i in model.graph.input if i.name not in taken and i.name not in renames.values())
        graph.output.extend(model.graph.output)
        graph.node.extend(model.graph.node)
        graph.initializer.extend(model.graph.initializer)
        graph.value_info.extend(model.graph.value_info)
    assert merged is not None
    _rename(merged.graph, {previous: "hidden_out"})
    merged.graph.name = out.stem
    _save(merged, out)
    return out


def _rename(graph, renames: dict[str, str]) -> None:  # onnx.GraphProto (onnx is optional)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)


def _drop(values, names: set[str]) -> None:  # a repeated ValueInfoProto field
    kept = [v for v in values if v.name not in names]
    del values[:]
    values.extend(kept)


def _save(model, out: Path) -> None:  # onnx.ModelProto
    """Written in a directory of its own, then moved into place: the weights, the graph, and
    last their checksum, which says the file is whole (a node killed while merging merges
    again; two processes merging the same layers at once each move a whole copy)."""
    import onnx

    data = out.name + ".data"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=TEMP_PREFIX) as tmp:
        onnx.save_model(model, str(Path(tmp) / out.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)  # small ones inline: shape inference reads them
        _checksum(Path(tmp) / out.name).write_text(_digest(Path(tmp) / out.name))
        for name in (data, out.name, _checksum(out).name):  # the checksum last
            (Path(tmp) / name).replace(out.parent / name)


TEMP_PREFIX = ".merging-"


def _checksum(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def _digest(out: Path) -> str:
    """sha256 of the graph file and its weights file, one after the other."""
    digest = hashlib.sha256()
    for path in (out, out.with_name(out.name + ".data")):
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _whole(out: Path, verify: bool) -> bool:
    try:
        return _checksum(out).is_file() and (not verify or _checksum(out).read_text() == _digest(out))
    except OSError:  # a part missing
        return False


def discard(out: Path) -> None:
    """Delete a merged file and its parts (one that would not load: it is merged again)."""
    for path in (_checksum(out), out, out.with_name(out.name + ".data")):
        path.unlink(missing_ok=True)


def remove_merged_except(directory: Path, keep: set[str]) -> list[str]:
    """Delete what ``directory`` holds but the merged files ``keep`` (names): a node's earlier
    segments, of this model or another, and what a merge killed midway left. Best effort: the
    names it could not delete."""
    left = []
    for path in directory.glob("*"):
        if path.name.removesuffix(".data").removesuffix(".sha256") in keep:
            continue
        try:
            if path.is_dir() and path.name.startswith(TEMP_PREFIX):
                shutil.rmtree(path)
            elif path.name.startswith(PREFIX):
                path.unlink()
        except OSError:
            left.append(path.name)
    return left

"""Contiguous in-place layers merged into one ONNX graph: one session call per step for the run.

Each layer piece is its own graph, and each ONNX Runtime call costs about 0.13 ms of
binding, dispatch and planning before any arithmetic; for a small model that is a fifth of
a decode step (SmolLM2-135M int4, 30 layers: 20.6 ms per step per layer, 16.8 merged). A
node therefore merges the layers it runs back to back into one graph when it loads a
segment. Layer ``i``'s names get the prefix ``l{i}_``; what all layers take alike (the
rotary tables, ``seqlens_k``, ``total_sequence_length``) is one input, hidden states flow
from layer to layer inside the graph:

    inputs:  hidden, seqlens_k, total_sequence_length, cos_cache, sin_cache, l{i}_past_key, l{i}_past_value
    outputs: hidden_out, l{i}_present_key, l{i}_present_value

Merging needs the ``onnx`` package, which a node install does not carry (it has no wheel
for Termux): without it a node runs its layers one call each, as before. The merged model
is written beside the pieces (weights in one external-data file, so any size saves) and
loaded from there: ONNX Runtime keeps a model given as bytes alive, which would double the
resident weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import tempfile
from collections.abc import Sequence
from pathlib import Path

from linguamq.schemas.manifest import PieceSpec

SHARED_INPUTS = ("seqlens_k", "total_sequence_length", "cos_cache", "sin_cache")
PER_LAYER_INPUTS = ("past_key", "past_value")
PER_LAYER_OUTPUTS = ("present_key", "present_value")
PREFIX = "layers-"  # merged files in a directory are named layers-{first}-{last}-{digest}.onnx


def can_merge() -> bool:
    return importlib.util.find_spec("onnx") is not None


def layer_name(layer: int, name: str) -> str:
    return f"l{layer}_{name}"


def merged_file(specs: Sequence[PieceSpec]) -> str:
    """The file name of these pieces merged: their content decides it, so a stale one never matches."""
    digest = hashlib.sha256("".join(s.sha256 for s in specs).encode()).hexdigest()[:16]
    return f"{PREFIX}{specs[0].index - 1}-{specs[-1].index - 1}-{digest}.onnx"


def merge_layers(directory: Path, specs: Sequence[PieceSpec], out_dir: Path) -> Path:
    """Merge the layer pieces ``specs`` (consecutive, in-place IO) found in ``directory``
    into ``out_dir / merged_file(specs)``, unless that is there already; its path."""
    out = out_dir / merged_file(specs)
    if out.is_file():
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
    """Written in a directory of its own, then moved into place, weights first: a merged file
    that exists is whole (a node killed while merging merges again), and two processes
    merging the same layers at once each move a whole copy."""
    import onnx

    data = out.name + ".data"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merging-") as tmp:
        onnx.save_model(model, str(Path(tmp) / out.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)  # small ones inline: shape inference reads them
        (Path(tmp) / data).replace(out.parent / data)
        (Path(tmp) / out.name).replace(out)


def remove_merged_except(directory: Path, keep: set[str]) -> None:
    """Delete merged files in ``directory`` other than ``keep`` (names): a node's earlier segments."""
    for path in directory.glob(f"{PREFIX}*"):
        if path.name.removesuffix(".data") not in keep:
            path.unlink(missing_ok=True)

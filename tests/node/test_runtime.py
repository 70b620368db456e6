"""SegmentRuntime: whole model vs split segments, cached decode, input checks, artifacts."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from linguamq.node import merge
from linguamq.node.errors import ArtifactError, ContextOverflowError, RuntimeInputError
from linguamq.node.runtime import MERGED_DIR, LoadedPiece, MergedLayers, RuntimeSettings, SegmentRuntime
from linguamq.schemas.manifest import ModelManifest

Art = tuple[Path, ModelManifest]
IDS = np.random.default_rng(0).integers(1, 320, (1, 12)).astype(np.int64)


def runtime(art: Art, first: int = 0, last: int | None = None, **settings: object) -> SegmentRuntime:
    path, manifest = art
    last = len(manifest.pieces) - 1 if last is None else last
    return SegmentRuntime(manifest=manifest, artifact_dir=path, first=first, last=last,
                          settings=RuntimeSettings(intra_op_threads=1, **settings))


def positions(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)[None]


def test_split_segments_give_the_same_logits_as_one(artifacts: Art) -> None:
    whole = runtime(artifacts)
    front, back = runtime(artifacts, 0, 2), runtime(artifacts, 3)
    assert front.takes_ids and not front.gives_logits and back.gives_logits and not back.takes_ids
    expected = whole.run("s", IDS, positions(0, 12))
    hidden = front.run("s", IDS, positions(0, 12))
    assert hidden.shape == (1, 12, 64) and hidden.dtype == np.float32
    assert np.array_equal(back.run("s", hidden, positions(0, 12)), expected)
    step = np.array([[5]])
    assert np.array_equal(back.run("s", front.run("s", step, positions(12, 1)), positions(12, 1)),
                          whole.run("s", step, positions(12, 1)))


def test_cached_decode_equals_full_recompute(artifacts: Art) -> None:
    rt = runtime(artifacts)
    rt.run("inc", IDS[:, :6], positions(0, 6))
    for t in range(6, 12):
        cached = rt.run("inc", IDS[:, t:t + 1], positions(t, 1))
        full = rt.run(f"full{t}", IDS[:, :t + 1], positions(0, t + 1))
        assert cached.shape == (1, 320)
        assert np.abs(cached - full).max() < 1e-4
    assert rt.context_length("inc") == 12


def test_sessions_are_independent_and_drop_forgets(artifacts: Art) -> None:
    alone = runtime(artifacts)
    expected = [alone.run("x", IDS[:, :4], positions(0, 4)), alone.run("x", IDS[:, 4:5], positions(4, 1))]
    rt = runtime(artifacts)
    first = rt.run("a", IDS[:, :4], positions(0, 4))
    rt.run("b", IDS[:, 4:10], positions(0, 6))  # another session in between
    second = rt.run("a", IDS[:, 4:5], positions(4, 1))
    assert np.array_equal(first, expected[0]) and np.array_equal(second, expected[1])
    rt.drop("a")
    assert rt.context_length("a") == 0 and rt.context_length("b") == 6


def test_positions_must_follow_the_cache(artifacts: Art) -> None:
    rt = runtime(artifacts)
    rt.run("s", IDS[:, :4], positions(0, 4))
    with pytest.raises(RuntimeInputError, match="4..4"):
        rt.run("s", IDS[:, 4:5], positions(7, 1))
    with pytest.raises(RuntimeInputError, match="shape"):
        rt.run("s", IDS[:, 4:6], positions(4, 1))
    assert rt.context_length("s") == 4  # a rejected step leaves the cache alone


def test_context_past_max_context_is_refused(artifacts: Art) -> None:
    rt = runtime(artifacts)
    ids = np.ones((1, 41), dtype=np.int64)  # the fixture exported max_context=40
    with pytest.raises(ContextOverflowError, match="max_context 40"):
        rt.run("s", ids, positions(0, 41))
    assert rt.run("s", ids[:, :40], positions(0, 40)).shape == (1, 320)


def test_bad_inputs_are_refused(artifacts: Art) -> None:
    rt, back = runtime(artifacts), runtime(artifacts, 1)
    with pytest.raises(RuntimeInputError, match="out of range"):
        rt.run("s", np.array([[320]]), positions(0, 1))
    with pytest.raises(RuntimeInputError, match="float32"):
        back.run("s", np.zeros((1, 2, 64), np.float16), positions(0, 2))
    with pytest.raises(RuntimeInputError, match="shape"):
        back.run("s", np.zeros((1, 2, 63), np.float32), positions(0, 2))


def test_tampered_or_missing_piece_is_refused(artifacts: Art, tmp_path: Path) -> None:
    path, manifest = artifacts
    copy = tmp_path / "art"
    shutil.copytree(path, copy)
    data = bytearray((copy / "layer.1.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "layer.1.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="layer.1.*sha256"):
        runtime((copy, manifest))
    runtime((copy, manifest), 0, 1)  # a segment without that piece does not care
    (copy / "head.onnx").unlink()
    with pytest.raises(ArtifactError, match="head.*missing"):
        runtime((copy, manifest), 3)
    with pytest.raises(ArtifactError, match="outside"):
        runtime(artifacts, 2, 9)


@pytest.mark.parametrize("level", ["disable", "basic", "all"])
def test_optimisation_levels_agree(artifacts: Art, level: str) -> None:
    ref = runtime(artifacts).run("s", IDS, positions(0, 12))
    got = runtime(artifacts, graph_optimization=level, allow_spinning=False).run("s", IDS, positions(0, 12))
    assert np.abs(got - ref).max() < 1e-4


def test_a_new_segment_shares_the_pieces_it_keeps_and_computes_the_same(artifacts: Art) -> None:
    """A node given a new segment overlapping its old one keeps those pieces' sessions
    (loading is most of a failover); the new runtime's output is the same."""
    path, manifest = artifacts
    settings = RuntimeSettings(intra_op_threads=1, merge_layers=False)
    old = runtime(artifacts, 0, 2, merge_layers=False)
    new = SegmentRuntime(manifest=manifest, artifact_dir=path, first=1, last=3, settings=settings, reuse=old.loaded)
    shared = {p.spec.index for p in new.loaded if isinstance(p, LoadedPiece) and any(p is q for q in old.loaded)}
    assert shared == {1, 2}  # piece 3 was not held: loaded
    fresh = runtime(artifacts, 1, 3, merge_layers=False)
    hidden = runtime(artifacts, 0, 0).run("s", IDS, positions(0, 12))
    assert np.array_equal(new.run("s", hidden, positions(0, 12)), fresh.run("s", hidden, positions(0, 12)))


def test_a_piece_of_another_model_is_not_reused(artifacts: Art) -> None:
    path, manifest = artifacts
    old = runtime(artifacts, 0, 2, merge_layers=False)
    other = [dataclasses.replace(p, spec=dataclasses.replace(p.spec, sha256="0" * 64)) for p in old.loaded
             if isinstance(p, LoadedPiece)]
    new = SegmentRuntime(manifest=manifest, artifact_dir=path, first=0, last=2,
                         settings=RuntimeSettings(intra_op_threads=1, merge_layers=False), reuse=other)
    assert not any(p is q for p in new.loaded for q in other)


def test_a_segments_layers_run_as_one_graph_with_the_outputs_of_one_call_each(artifacts: Art) -> None:
    """Merged (node/merge.py): one ONNX Runtime call for all of a segment's layers, the same
    logits through prefill and cached decode as one call per layer, KV kept per layer."""
    merged, single = runtime(artifacts), runtime(artifacts, merge_layers=False)
    assert [type(u) for u in merged.loaded] == [LoadedPiece, MergedLayers, LoadedPiece]  # embed, layers 0-2, head
    assert len(single.loaded) == 5 and merged.pieces == single.pieces
    for start, end in ((0, 9), (9, 10), (10, 11), (11, 12)):
        got, want = (rt.run("s", IDS[:, start:end], positions(start, end - start)) for rt in (merged, single))
        assert np.abs(got - want).max() < 1e-4
    assert merged.context_length("s") == 12 and merged.cache.sessions() == single.cache.sessions()


def test_merged_layers_are_kept_for_the_same_layers_and_merged_again_for_others(artifacts: Art) -> None:
    path, manifest = artifacts
    old = runtime(artifacts, 0, 2)  # embed, layers 0-1
    same = SegmentRuntime(manifest=manifest, artifact_dir=path, first=1, last=2,
                          settings=RuntimeSettings(intra_op_threads=1), reuse=old.loaded)
    assert same.loaded[0] is old.loaded[1]  # the same run of layers: its session is shared
    grown = SegmentRuntime(manifest=manifest, artifact_dir=path, first=1, last=3,
                           settings=RuntimeSettings(intra_op_threads=1), reuse=old.loaded)
    assert grown.merged_file != old.merged_file and not any(u is v for u in grown.loaded for v in old.loaded)
    hidden = runtime(artifacts, 0, 0).run("s", IDS, positions(0, 12))
    assert np.abs(grown.run("s", hidden, positions(0, 12))
                  - runtime(artifacts, 1, 3, merge_layers=False).run("s", hidden, positions(0, 12))).max() < 1e-4


@pytest.mark.parametrize(("damage", "verify"), [("weights changed", True), ("weights gone", True),
                                               ("weights gone", False), ("graph empty", False)])
def test_a_damaged_merged_file_is_merged_again(artifacts: Art, tmp_path: Path, damage: str, verify: bool) -> None:
    """A disk loses or changes a merged file as it may a piece: the runtime notices (its
    checksum; without verification, because it will not load), merges again and computes
    what the pieces compute."""
    path, manifest = artifacts
    copy = tmp_path / "art"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns(MERGED_DIR))
    want = runtime((copy, manifest), merge_layers=False).run("s", IDS, positions(0, 12))
    graph = runtime((copy, manifest)).merged_file
    assert graph is not None
    weights = graph.with_name(graph.name + ".data")
    match damage:
        case "weights changed":
            data = bytearray(weights.read_bytes())
            data[len(data) // 4:len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)  # a stretch zeroed
            weights.write_bytes(bytes(data))
        case "weights gone":
            weights.unlink()
        case "graph empty":
            graph.write_bytes(b"")
    again = runtime((copy, manifest), verify_sha256=verify)
    assert again.merged_file == graph and len(again.loaded) == 3
    assert np.abs(again.run("s", IDS, positions(0, 12)) - want).max() < 1e-4


def test_merged_layers_grow_their_kv_buffers_as_layers_one_by_one_do(tmp_path: Path) -> None:
    """Past the first capacity (256 positions) every layer's buffer is copied into a larger
    one; the merged graph reads them all where they now lie."""
    from linguamq.models.export import ExportOptions, export_model
    from linguamq.models.tiny import TinySpec, make_tiny
    make_tiny(TinySpec(family="llama", layers=3, hidden=64, heads=4, kv_heads=2, vocab=320, seed=5), tmp_path / "hf")
    manifest = export_model(tmp_path / "hf", tmp_path / "art", ExportOptions(max_context=700))
    art = (tmp_path / "art", manifest)
    ids = np.random.default_rng(1).integers(1, 320, (1, 600)).astype(np.int64)
    merged, single = runtime(art), runtime(art, merge_layers=False)
    assert len(merged.loaded) == 3
    for start, end in ((0, 250), (250, 300), (300, 301), (301, 560), (560, 561), (561, 562)):
        got, want = (rt.run("s", ids[:, start:end], positions(start, end - start)) for rt in (merged, single))
        assert np.abs(got - want).max() < 1e-4, (start, end)


def test_layers_run_one_by_one_where_they_cannot_be_merged(artifacts: Art, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No `onnx` package (a Termux node), or no room to write the merged file: the same logits."""
    path, manifest = artifacts
    want = runtime(artifacts, merge_layers=False).run("s", IDS, positions(0, 12))
    copy = tmp_path / "art"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns(MERGED_DIR))
    (copy / MERGED_DIR).write_text("a file where the merged directory would go")
    unwritable = runtime((copy, manifest))
    with monkeypatch.context() as patch:
        patch.setattr(merge.importlib.util, "find_spec", lambda _name: None)
        no_onnx = runtime(artifacts)
    for rt in (unwritable, no_onnx):
        assert len(rt.loaded) == 5 and rt.merged_file is None
        assert np.array_equal(rt.run("s", IDS, positions(0, 12)), want)


def test_a_prompt_in_chunks_gives_the_logits_of_the_whole_prompt(artifacts: Art) -> None:
    whole = runtime(artifacts).run("w", IDS, positions(0, 12))
    rt = runtime(artifacts)
    for start, end in ((0, 5), (5, 6), (6, 11), (11, 12)):  # chunked prefill, decode steps between
        chunked = rt.run("c", IDS[:, start:end], positions(start, end - start))
    assert np.abs(chunked - whole).max() < 1e-4


def test_decode_writes_the_cache_in_place_and_a_recomputed_step_overwrites_it(artifacts: Art) -> None:
    rt = runtime(artifacts)
    rt.run("s", IDS[:, :6], positions(0, 6))
    buffers = [rt.cache.get("s", layer)[0] for layer in range(3)]
    first = rt.run("s", IDS[:, 6:7], positions(6, 1))
    rt.run("s", IDS[:, 7:8], positions(7, 1))
    assert all(rt.cache.get("s", layer)[0].ctypes.data == buffer.ctypes.data  # no copy per step
               for layer, buffer in enumerate(buffers))
    rt.cache.truncate("s", 6)  # the alignment rule: the step at 6 again (a retry, a redelivery)
    assert rt.context_length("s") == 6
    assert np.array_equal(rt.run("s", IDS[:, 6:7], positions(6, 1)), first)
    assert np.abs(rt.run("s", np.array([[9]]), positions(7, 1)) -
                  runtime(artifacts).run("x", np.concatenate([IDS[:, :7], [[9]]], axis=1), positions(0, 8))).max() < 1e-4

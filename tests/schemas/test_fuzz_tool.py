"""schemas/fuzz.py: every payload it makes is refused by its decoder (the hostile-input case
counts one ErrorReport per payload: one that decoded would be a false alarm, and would act
on the cluster), and a stream is the same for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from linguamq.schemas import blobs, envelope, examples, fuzz
from linguamq.schemas.errors import SchemaError

N = 140  # ten rounds of every kind


@pytest.mark.parametrize("cls", sorted(examples.EXAMPLES, key=lambda c: c.TYPE), ids=lambda c: c.TYPE)
def test_every_json_payload_is_refused(cls) -> None:
    labels = set()
    for item in fuzz.json_payloads(cls, N, seed=3):
        with pytest.raises(SchemaError):
            cls.from_json(item.payload)
        labels.add(item.label.split(":")[0].split(" (")[0])
    assert {"random bytes", "deep JSON", "huge JSON", "truncated JSON"} <= labels


@pytest.mark.parametrize("kind", ["envelope", "blob_chunk"])
def test_every_frame_payload_is_refused(kind) -> None:
    limit = 1 << 16
    decode = (lambda p: envelope.decode(p, max_bytes=limit)) if kind == "envelope" else blobs.decode_chunk
    items = list(fuzz.frame_payloads(kind, N, seed=3, limit=limit))
    for item in items:
        with pytest.raises(SchemaError):
            decode(item.payload)
    if kind == "envelope":
        assert any("over the 65536-byte limit" in i.label for i in items)
        assert any("declares gigabytes" in i.label for i in items)


def test_act_payloads_decode_but_are_never_a_runnable_step_of_a_real_session() -> None:
    for takes_ids, piece in ((True, 0), (False, 2)):
        for item in fuzz.act_payloads(70, seed=3, epoch=5, piece=piece, takes_ids=takes_ids, hidden=64):
            header, array = envelope.decode(item.payload)
            assert header.session.startswith("fz")
            well_formed = array.ndim >= 2 and array.shape[0] == 1 and array.shape[1] >= 1 and (
                (array.dtype.kind in "iu" and array.ndim == 2) if takes_ids else
                (array.dtype == np.float32 and array.ndim == 3 and array.shape[2] == 64))  # what the runtime takes
            refused_by = [header.epoch != 5, header.piece != piece, header.start_pos != 0, not well_formed,
                          array.dtype.kind == "f" and not np.isfinite(array).all()]
            assert any(refused_by), item.label


def test_a_stream_is_reproducible_by_seed_and_differs_across_seeds() -> None:
    def take(seed: int) -> list[bytes]:
        return [i.payload for i in fuzz.json_payloads(examples.MANIFEST.__class__, 30, seed=seed)]
    assert take(1) == take(1)
    assert take(1) != take(2)

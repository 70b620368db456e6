"""The text stream decodes a bounded window per token and emits what decoding everything would."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from linguamq.hub.textstream import MAX_PENDING, TextStream

Decode = Callable[[list[int]], str]
SCRIPTS = {
    "latin": "Grüße aus Köln, déjà vu: naïve façade. The quick brown fox.",
    "cjk": "東京の天気は晴れです。中文字符和日本語のテキスト。한국어 문장도 있어요.",
    "emoji": "emoji 😀🎉 family 👩‍👩‍👧 flag 🇫🇷 and 🧑🏽‍💻 ok",
    "cyrillic": "Съешь же ещё этих мягких французских булок.",
    "mixed": "Köln 東京 😀 Привет مرحبا x",
}
CORPUS = list(SCRIPTS.values())[:4] * 20  # "mixed" also holds words no merge has seen


def byte_level() -> Tokenizer:
    """models/tiny.py's recipe on many scripts: merges join bytes of different characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def sentencepiece_like() -> Tokenizer:
    """Llama's kind: "▁" for spaces, byte-fallback tokens, the text's first space stripped."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS[:2], trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {t: i + 3 for t, i in spec["vocab"].items()}
    vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = trained.normalizer
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


TOKENIZERS = {"byte-level": byte_level(), "sentencepiece": sentencepiece_like()}


def decoder(tok: Tokenizer) -> Decode:
    return lambda ids: tok.decode(ids, skip_special_tokens=True)  # as the hub and run-local decode


class DecodeEverything:
    """The stream as it was: the whole list decoded per token (the specification of the output)."""

    def __init__(self, decode: Decode, stop: tuple[str, ...], on_text: Callable[[str], None]) -> None:
        self._decode, self._stop, self._on_text = decode, tuple(s for s in stop if s), on_text
        self._sent, self._cut = 0, None

    def update(self, tokens: list[int]) -> bool:
        text = self._decode(tokens)
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._cut = min(hits)
            self._emit(text[:self._cut])
            return True
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self._stop:
            held = max(held, max((n for n in range(1, len(s)) if text.endswith(s[:n])), default=0))
        self._emit(text[:len(text) - held])
        return False

    def finish(self, tokens: list[int]) -> str:
        text = self._decode(tokens)
        text = text if self._cut is None else text[:self._cut]
        self._emit(text)
        return text

    def _emit(self, final: str) -> None:
        if len(final) > self._sent:
            self._on_text(final[self._sent:])
            self._sent = len(final)


def run(make: Callable, decode: Decode, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[list[str]], str]:
    """Feed ``ids`` one token at a time until a stop string: (pieces emitted per step, final text)."""
    steps: list[list[str]] = []
    stream = make(decode, stop, lambda text: steps[-1].append(text))
    tokens: list[int] = []
    for token in ids:
        tokens.append(token)
        steps.append([])
        if stream.update(tokens):
            break
    steps.append([])
    return steps, stream.finish(tokens)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_pieces_are_the_whole_text_in_every_script(name: str, script: str) -> None:
    tok, text = TOKENIZERS[name], SCRIPTS[script]
    ids = tok.encode(text).ids
    steps, final = run(TextStream, decoder(tok), ids)
    assert final == text and "".join(p for step in steps for p in step) == text
    assert (steps, final) == run(DecodeEverything, decoder(tok), ids)  # the same pieces at the same tokens


@pytest.mark.parametrize("name", TOKENIZERS)
def test_characters_split_across_tokens_are_held_until_complete(name: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode("😀👩‍👩‍👧").ids
    steps, _ = run(TextStream, decoder(tok), ids)
    assert any(not step for step in steps[:-1])  # some tokens end inside a character: nothing sent
    assert all("\ufffd" not in p for step in steps for p in step)


def answer(name: str, rng: np.random.Generator, length: int = 300) -> list[int]:
    """Token ids as a broken model could sample them: any token, characters split into bytes,
    long runs of bytes that never form a character and of tokens that decode to nothing."""
    tok = TOKENIZERS[name]
    vocab = [i for i in range(tok.get_vocab_size()) if name == "byte-level" or not tok.id_to_token(i).startswith("<0x")]
    text = "".join(SCRIPTS.values())
    ids: list[int] = []
    while len(ids) < length:
        match int(rng.integers(5)):
            case 0 | 1: ids += rng.choice(vocab, int(rng.integers(1, 8))).tolist()
            case 2: ids += tok.encode(text[(at := int(rng.integers(len(text)))):at + int(rng.integers(1, 12))]).ids
            case 3: ids += [tok.token_to_id("ä" if name == "byte-level" else "<0xE4>")] * int(rng.integers(1, 3 * MAX_PENDING))
            case 4: ids += [tok.token_to_id("<|endoftext|>" if name == "byte-level" else "</s>")] * 3 * MAX_PENDING
        if name == "sentencepiece":
            # Byte fallback makes U+FFFD of every byte in a run with an invalid one, so valid
            # characters already streamed would change to U+FFFD: no stream can match that.
            ids += tok.encode("x").ids[-1:]
    return ids[:length]


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("name", TOKENIZERS)
def test_any_token_sequence_streams_as_decoding_everything_did(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    decode, ids = decoder(TOKENIZERS[name]), answer(name, rng)
    text = decode(ids)
    at = int(rng.integers(0, len(text) - 3))
    stop = (text[at:at + int(rng.integers(1, 4))], "never seen") if seed % 2 else ()
    assert run(TextStream, decode, ids, stop) == run(DecodeEverything, decode, ids, stop)


def decoded_per_step(name: str, ids: list[int]) -> list[int]:
    """Tokens decoded (all decode calls together) at each token while streaming ``ids``."""
    tok, steps = TOKENIZERS[name], [0]

    def counting(tokens: list[int]) -> str:
        steps[-1] += len(tokens)
        return tok.decode(tokens, skip_special_tokens=True)

    stream, tokens = TextStream(counting, ("never seen",), lambda _text: None), []
    for token in ids:
        tokens.append(token)
        stream.update(tokens)
        steps.append(0)
    return steps[:-1]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_decoding_work_per_token_does_not_grow_with_the_answer(name: str) -> None:
    text = TOKENIZERS[name].encode(" ".join(SCRIPTS.values())).ids * 100
    assert max(decoded_per_step(name, text[:100])) == max(decoded_per_step(name, text[:2000])) <= 2 * MAX_PENDING
    for seed in range(10):  # also through runs of invalid bytes and of tokens that decode to nothing
        assert max(decoded_per_step(name, answer(name, np.random.default_rng(seed), 2000))) <= 8 * MAX_PENDING


def test_no_decoder_or_nothing_to_do_decodes_nothing() -> None:
    calls: list[int] = []
    assert not TextStream(None, ("x",), print).update([1, 2])
    assert not TextStream(lambda t: calls.append(len(t)) or "x", (), None).update([1, 2])
    assert TextStream(None, (), None).finish([1, 2]) == "" and calls == []

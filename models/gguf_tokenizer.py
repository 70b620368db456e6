"""A GGUF file's tokenizer metadata -> a `tokenizers` Tokenizer (what `tokenizer.json` holds).

GGUF stores no tokenizer.json, only llama.cpp's description of one: the vocabulary
(`tokenizer.ggml.tokens`, already in the byte-level alphabet for "gpt2" models), the
merges, a token type per id (3 = control, 4 = user-defined), the name of the
pre-tokenizer (`tokenizer.ggml.pre`, which picks the split regex) and BOS/EOS with
`add_bos_token`. We rebuild a byte-level BPE from that ("gpt2"), or for SentencePiece
vocabularies ("llama": scores, <0xXX> byte tokens, "▁" for spaces) a BPE with byte
fallback whose merges follow the scores when the file lists none. BOS is added by the
post-processor, so every path that calls `encode` agrees with the file.
"""

from __future__ import annotations

import dataclasses

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from linguamq.models.errors import UnsupportedArchitectureError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types
SPACE = "\u2581"  # SentencePiece's visible space

# Split regexes as llama.cpp's pre-tokenizer types define them (llama-vocab.cpp).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
          "dbrx": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}
GPT2_PRES = ("default", "gpt2", "gpt-2")  # GPT-2's own regex (ByteLevel's built-in one)
DIGIT_PRES = ("smollm",)  # single digits, then GPT-2's regex (SmolLM's tokenizer.json does this)
SUPPORTED_PRES = (*SPLITS, *GPT2_PRES, *DIGIT_PRES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFTokenizerSpec:
    """The tokenizer metadata of a GGUF file, decoded."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    merges: tuple[str, ...]  # "left right"
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool = False
    end_of_generation_ids: tuple[int, ...] = ()  # EOT, EOM: ends a turn like EOS
    scores: tuple[float, ...] = ()  # SentencePiece: a higher score merges first
    add_space_prefix: bool = True  # SentencePiece: "▁" before the text


def build_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    """A Tokenizer equivalent to the one the GGUF file describes."""
    if spec.model == "gpt2":
        tok = _byte_level(spec)
    elif spec.model == "llama":
        tok = _sentencepiece(spec)
    else:
        raise UnsupportedArchitectureError(f"GGUF tokenizer model {spec.model!r} is not supported "
                                           "(only 'gpt2', byte-level BPE, and 'llama', SentencePiece BPE)")
    _add_special_tokens(tok, spec)
    tok.post_processor = _post_processor(spec)
    return tok


def _byte_level(spec: GGUFTokenizerSpec) -> Tokenizer:
    vocab = {token: index for index, token in enumerate(spec.tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[_merge(m) for m in spec.merges], fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(spec.pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(spec: GGUFTokenizerSpec) -> Tokenizer:
    """Spaces become "▁" (one before the text when add_space_prefix), characters outside the
    vocabulary fall back to their <0xXX> byte tokens."""
    vocab = {token: index for index, token in enumerate(spec.tokens)}
    merges = [_merge(m) for m in spec.merges] if spec.merges else _merges_from_scores(vocab, spec.scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, split=False,
                                                 prepend_scheme="first" if spec.add_space_prefix else "never")
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if spec.add_space_prefix else []))
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: tuple[float, ...]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge ranked by the token's score (ties: the
    longer left part first, then the token's and the parts' order): how transformers reads these
    files, and what SentencePiece's highest-score-first merging amounts to."""
    if len(scores) != len(vocab):
        raise UnsupportedArchitectureError("a SentencePiece GGUF vocabulary needs one score per token")
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(vocab, scores, strict=True):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in splits)
    ranked.sort(key=lambda m: m[:3], reverse=True)  # stable: equal keys keep the order above
    return [(left, right) for *_, left, right in ranked]


def _merge(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise UnsupportedArchitectureError(f"GGUF merge {merge!r} is not 'left right'")
    return left, right


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre in GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    raise UnsupportedArchitectureError(f"GGUF pre-tokenizer {pre!r} is not supported; "
                                       f"supported: {', '.join(SUPPORTED_PRES)}")


def _add_special_tokens(tok: Tokenizer, spec: GGUFTokenizerSpec) -> None:
    """Control tokens become special (skipped when decoding), user-defined ones plain added
    tokens; both are matched whole in the text, as llama.cpp does (they keep their ids)."""
    pairs = list(zip(spec.tokens, spec.token_types, strict=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in pairs if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in pairs if k == USER_DEFINED])


def _post_processor(spec: GGUFTokenizerSpec) -> processors.PostProcessor:
    bos = _added(spec, spec.add_bos_token, spec.bos_token_id)
    eos = _added(spec, spec.add_eos_token, spec.eos_token_id)
    if not bos and not eos:
        return processors.ByteLevel(trim_offsets=False)
    single = [t for t, _ in bos] + ["$A"] + [t for t, _ in eos]
    return processors.TemplateProcessing(single=single, pair=[*single, "$B:1"], special_tokens=bos + eos)


def _added(spec: GGUFTokenizerSpec, add: bool, token_id: int | None) -> list[tuple[str, int]]:
    return [(spec.tokens[token_id], token_id)] if add and token_id is not None else []

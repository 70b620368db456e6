"""Chat templates: a conversation (`messages`) becomes the prompt text an instruct model expects.

The template is the model's own Jinja source (exported beside the tokenizer) and comes from
whoever published the model, so it runs in Jinja's immutable sandbox: no attribute access
to Python internals, no mutation of what we pass in. The helpers are the ones Hugging Face
templates call (`raise_exception`, `strftime_now`); the generation prompt is always added,
since we render a conversation in order to answer it. The head and run-local both render
with this module, so a chat gives the same tokens through either.

Needs only `jinja2` (a small pure-Python library): `hub/` stays free of heavy dependencies.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ChatMessage

NO_TEMPLATE = "this model has no chat template: send a prompt instead of messages"
ChatEncoder = Callable[[Sequence[ChatMessage]], list[int]]  # messages -> prompt token ids, or ChatError


class ChatError(Exception):
    """A conversation that cannot be rendered: no template, or the template refused it."""


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None) -> None:
        # As transformers renders them: templates are written for these whitespace rules.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
        self._template: jinja2.Template | None = None
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:  # said on use: the model still serves plain prompts
            self._broken = ChatError(f"the model's chat template does not compile: {exc}")
        self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text for `messages`, ending where the assistant's answer begins."""
        if self._template is None:
            raise self._broken
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            # tools and documents as transformers passes them when there are none
            return self._template.render(messages=turns, tools=None, documents=None, add_generation_prompt=True,
                                         **self._tokens)
        except jinja2.TemplateError as exc:  # raise_exception's message, the sandbox's refusals
            raise ChatError(f"the chat template refused the messages: {exc}") from exc
        except Exception as exc:  # a template may fail on anything: a type error, a bad index
            raise ChatError(f"the chat template failed on the messages: {type(exc).__name__}: {exc}") from exc


def load_template(artifacts: Path, manifest: ModelManifest) -> ChatTemplate | None:
    """The model's chat template from its artifact directory; None if it has none."""
    spec = manifest.chat_template
    if spec is None:
        return None
    source = (artifacts / spec.file).read_text(encoding="utf-8")
    return ChatTemplate(source, bos_token=spec.bos_token, eos_token=spec.eos_token)


def chat_encoder(template: ChatTemplate | None, encode_text: Callable[[str], list[int]]) -> ChatEncoder:
    """messages -> prompt ids, as the head and run-local both tokenize a chat. `encode_text`
    must add no special tokens: the template writes those it wants (transformers'
    `apply_chat_template` does the same; a BOS added twice would change the answer)."""
    def encode(messages: Sequence[ChatMessage]) -> list[int]:
        return encode_text(render(template, messages))
    return encode


def no_chat(messages: Sequence[ChatMessage]) -> list[int]:
    """The ChatEncoder of a model without a chat template."""
    raise ChatError(NO_TEMPLATE)


def render(template: ChatTemplate | None, messages: Sequence[ChatMessage]) -> str:
    """`messages` as prompt text, or ChatError saying why not (a model without a template)."""
    if template is None:
        raise ChatError(NO_TEMPLATE)
    return template.render(messages)


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Jinja's own tojson escapes HTML, which would change the prompt's text."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)

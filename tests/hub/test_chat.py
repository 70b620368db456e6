"""Chat templates: rendered as the model expects, in a sandbox, with clear errors."""

from __future__ import annotations

import pytest

from linguamq.hub.chat import ChatError, ChatTemplate, render
from linguamq.schemas.requests import ChatMessage

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = (ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi"))


def test_a_chat_is_rendered_with_the_generation_prompt() -> None:
    assert ChatTemplate(CHATML).render(CHAT) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                                 "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_special_tokens_and_helpers_are_there_as_in_transformers() -> None:
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m.content | tojson }}{% endfor %}"
                            "{{ eos_token }}{{ strftime_now('%Y') | length }}", bos_token="<s>", eos_token="</s>")
    assert template.render([ChatMessage(role="user", content="é <b>")]) == '<s>"é <b>"</s>4'


def test_the_template_can_refuse_a_conversation() -> None:
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}")
    with pytest.raises(ChatError, match="user first"):
        template.render(CHAT)


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}",
                                    "{{ messages[0].__class__.__init__.__globals__ }}"])
def test_the_sandbox_refuses_python_internals(source: str) -> None:
    with pytest.raises(ChatError, match="refused the messages"):
        ChatTemplate(source).render(CHAT)


def test_an_unsafe_attribute_is_undefined_as_in_transformers() -> None:
    assert ChatTemplate("[{{ ''.__class__ }}{{ messages[0].__class__ }}]").render(CHAT) == "[]"


def test_a_template_that_fails_or_does_not_compile_says_so() -> None:
    with pytest.raises(ChatError, match="does not compile"):
        ChatTemplate("{% for m in messages %}").render(CHAT)
    with pytest.raises(ChatError, match="failed"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(CHAT)


def test_a_model_without_a_template_gets_a_clear_error() -> None:
    with pytest.raises(ChatError, match="no chat template: send a prompt"):
        render(None, CHAT)

"""Export copies a model's chat template where transformers finds it, with its special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from linguamq.hub.chat import ChatTemplate, chat_encoder
from linguamq.models.chat_template import export_chat_template
from linguamq.models.errors import ModelDirError
from linguamq.schemas.manifest import file_sha256
from linguamq.schemas.requests import ChatMessage

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _model(path: Path, config: dict | None = None, jinja: str | None = None) -> Path:
    path.mkdir()
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


@pytest.mark.parametrize("template", [TEMPLATE, [{"name": "tool_use", "template": "x"},
                                                 {"name": "default", "template": TEMPLATE}]])
def test_the_template_of_tokenizer_config_is_copied_with_its_tokens(tmp_path: Path, template) -> None:
    model = _model(tmp_path / "m", {"chat_template": template, "bos_token": "<s>",
                                    "eos_token": {"content": "</s>", "special": True}})
    spec = export_chat_template(model, tmp_path)
    assert spec is not None and (tmp_path / spec.file).read_text() == TEMPLATE
    assert (spec.sha256, spec.bos_token, spec.eos_token) == (file_sha256(tmp_path / spec.file), "<s>", "</s>")


def test_a_chat_template_file_wins_over_tokenizer_config(tmp_path: Path) -> None:
    model = _model(tmp_path / "m", {"chat_template": "old"}, jinja=TEMPLATE)
    spec = export_chat_template(model, tmp_path)
    assert spec is not None and (tmp_path / spec.file).read_text() == TEMPLATE


@pytest.mark.parametrize("config", [None, {}, {"chat_template": [{"name": "tool_use", "template": "x"}]}])
def test_a_model_without_a_template_exports_none(tmp_path: Path, config) -> None:
    assert export_chat_template(_model(tmp_path / "m", config), tmp_path) is None
    assert not (tmp_path / "chat_template.jinja").exists()


def test_a_broken_tokenizer_config_is_named(tmp_path: Path) -> None:
    model = _model(tmp_path / "m")
    (model / "tokenizer_config.json").write_text("{nope")
    with pytest.raises(ModelDirError, match="tokenizer_config.json is not valid JSON"):
        export_chat_template(model, tmp_path)


# What transformers' apply_chat_template gives, token for token: the reference for instruct models.
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "bos-and-eos": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }}"
                    " [/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}"
                    "{{ raise_exception('roles alternate') }}{% endif %}{% endfor %}"),
    "whitespace-and-tools": ("{%- if tools is not none %}tools!{% endif %}\n{%- for m in messages %}\n"
                             "    {{- m.role + ': ' + (m.content | tojson) }}\n    {% if loop.last %}{% break %}"
                             "{% endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\nassistant:{% endif %}"),
}
CHAT = [{"role": "user", "content": "Hello <b>é</b>  "}, {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"}]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_our_rendering_gives_the_tokens_of_transformers(tiny_dirs: dict[str, Path], tmp_path: Path, name: str) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATES[name]}))
    spec = export_chat_template(model, tmp_path)
    assert spec is not None
    ours = ChatTemplate((tmp_path / spec.file).read_text(), bos_token=spec.bos_token, eos_token=spec.eos_token)
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    encode = chat_encoder(ours, lambda text: tokenizer.encode(text, add_special_tokens=False).ids)
    theirs = AutoTokenizer.from_pretrained(model).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    ids = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # transformers 5 returns a BatchEncoding
    assert encode([ChatMessage.from_dict(m) for m in CHAT]) == list(ids)

"""Export copies a model's chat template where transformers finds it, with its special tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linguamq.models.chat_template import export_chat_template
from linguamq.models.errors import ModelDirError
from linguamq.schemas.manifest import file_sha256

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

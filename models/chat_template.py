"""The chat template of a Hugging Face model directory, copied into its artifacts on export.

Where transformers looks for it: `chat_template.jinja` beside the tokenizer, else
`tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
we take "default"). The special tokens templates name (`bos_token`, `eos_token`) come from
`tokenizer_config.json` too: a string, or an added-token object with its `content`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from linguamq.models.hf import read_json
from linguamq.schemas.manifest import ChatTemplateSpec, file_sha256

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def export_chat_template(model_dir: Path, out_dir: Path) -> ChatTemplateSpec | None:
    """Write the model's chat template to `out_dir`; None (and no file) if it has none."""
    config = _tokenizer_config(model_dir)
    source = _template_source(model_dir, config)
    if source is None:
        return None
    target = out_dir / TEMPLATE_FILE
    target.write_text(source, encoding="utf-8")
    return ChatTemplateSpec(file=TEMPLATE_FILE, sha256=file_sha256(target),
                            bos_token=_token(config.get("bos_token")), eos_token=_token(config.get("eos_token")))


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / TOKENIZER_CONFIG
    return read_json(path) if path.is_file() else {}


def _template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None

"""Chat templates whose assistant turns are wrapped in {% generation %} tags, for assistant-only loss masks."""

import re
from importlib.resources import files
from pathlib import Path
from typing import Any

from lacuna.errors import LacunaError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}.*?\{%-?\s*endgeneration\s*-?%\}", re.DOTALL)
FAMILY_TEMPLATES = {"<|im_start|>": "chatml.jinja", "<|start_header_id|>": "llama3.jinja"}


def load_template(path: str | Path | None, tokenizer: Any) -> str:
    """Return the template at `path`, else the packaged template matching the tokenizer's chat family."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise LacunaError(f"cannot read chat template {path} ({error.strerror}): check --chat-template") from None
    vocabulary = tokenizer.get_vocab()
    for marker, name in FAMILY_TEMPLATES.items():
        if marker in vocabulary:
            return files("lacuna").joinpath("templates", name).read_text(encoding="utf-8")
    raise LacunaError(
        "tokenizer is neither ChatML nor Llama-3; pass --chat-template PATH with a template "
        "that wraps assistant replies in {% generation %}...{% endgeneration %} tags"
    )


def has_generation_tags(template: str) -> bool:
    """True if `template` marks assistant output with {% generation %}...{% endgeneration %}."""
    return GENERATION_TAG.search(template) is not None

"""Chat templates whose assistant turns are wrapped in {% generation %} tags, for assistant-only loss masks."""

import json
import re
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def check_template(template: str, name: str) -> None:
    """One-line errors for a chat template that does not compile or cannot mark assistant tokens."""
    try:
        compile_template(template)
    except TemplateSyntaxError as error:
        raise LacunaError(f"chat template {name} does not compile (line {error.lineno}: {error.message}): fix it"
                          ) from None
    if not has_generation_tags(template):
        raise LacunaError(f"chat template {name} has no {{% generation %}} tags, so assistant tokens cannot be "
                          "masked: use a generation-tagged template such as lacuna/templates/chatml.jinja via "
                          "--chat-template")


# ----------------------------------------------------------------------------- rendering with assistant spans

SPAN_START, SPAN_END = "\ufdd0", "\ufdd1"  # Unicode noncharacters: reserved for internal use, never in real text


class GenerationSpans(Extension):
    """`{% generation %}body{% endgeneration %}` renders as SPAN_START body SPAN_END: the assistant spans are found
    in the rendered text afterwards, with no per-block bookkeeping while rendering."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return [nodes.Output([nodes.TemplateData(SPAN_START)], lineno=line), *body,
                nodes.Output([nodes.TemplateData(SPAN_END)], lineno=line)]


def raise_exception(message: str) -> None:
    raise TemplateError(message)


def to_json(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=4)
def compile_template(source: str) -> Template:
    """`source` compiled in the sandboxed environment transformers' `apply_chat_template` uses (same options,
    filters and globals), so both render the same text; generation blocks leave span marks (GenerationSpans)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationSpans, loopcontrols])
    environment.filters["tojson"] = to_json
    environment.globals |= {"raise_exception": raise_exception,
                            "strftime_now": lambda format: datetime.now().strftime(format)}
    return environment.from_string(source)


def render_conversations(source: str, conversations: list[list[dict[str, str]]], variables: dict[str, Any]
                         ) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render each conversation with the chat template `source`; returns the texts and, per text, the character
    spans [start, end) of its {% generation %} blocks (the assistant output that is trained on)."""
    template = compile_template(source)
    # One context for the batch, emptied between conversations: what `Template.render` does, without rebuilding
    # the context (globals + variables) for every conversation, which costs more than rendering a short one.
    context = template.new_context({**variables, "messages": None})
    texts, spans = [], []
    for index, messages in enumerate(conversations):
        if any(SPAN_START in message["content"] or SPAN_END in message["content"] for message in messages):
            raise RenderError(index, "a message contains U+FDD0/U+FDD1, Unicode noncharacters lacuna reserves for "
                                     "marking assistant spans: remove them from the data")
        context.vars.clear(), context.exported_vars.clear()
        context.parent["messages"] = messages
        try:
            pieces = "".join(template.root_render_func(context)).split(SPAN_START)
        except Exception as error:  # TemplateError from raise_exception(), or any error the template runs into
            raise RenderError(index, f"the chat template fails on it ({type(error).__name__}: {error}): fix the "
                                     "record or the template") from None
        text, found = [pieces[0]], []
        length = len(pieces[0])
        for piece in pieces[1:]:
            inside, mark, after = piece.partition(SPAN_END)
            if not mark or SPAN_END in after:  # blocks always come in pairs, so only nesting breaks this
                raise LacunaError("the chat template's {% generation %} blocks are nested or unbalanced: fix the "
                                  "template so each assistant reply is wrapped in exactly one block")
            found.append((length, length + len(inside)))
            text += (inside, after)
            length += len(inside) + len(after)
        texts.append("".join(text))
        spans.append(found)
    return texts, spans


class RenderError(Exception):
    """Conversation `index` of the batch cannot be rendered."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index

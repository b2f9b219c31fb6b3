"""Chat templates whose assistant turns are wrapped in {% generation %} tags, for assistant-only loss masks."""

import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lacuna.errors import LacunaError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}.*?\{%-?\s*endgeneration\s*-?%\}", re.DOTALL)
# The first family whose marker tokens are all in the vocabulary picks the template (Qwen3 and Gemma/Mistral/Llama
# test tokenizers may also hold <|im_start|>, so the more specific families come first).
FAMILY_TEMPLATES = {("<start_of_turn>",): "gemma3.jinja", ("[INST]",): "mistral.jinja",
                    ("<|start_header_id|>",): "llama3.jinja", ("<|im_start|>", "<think>"): "qwen3.jinja",
                    ("<|im_start|>",): "chatml.jinja"}


def load_template(path: str | Path | None, tokenizer: Any) -> str:
    """Return the template at `path`, else the packaged template matching the tokenizer's chat family."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise LacunaError(f"cannot read chat template {path} ({error.strerror}): check --chat-template") from None
    vocabulary = tokenizer.get_vocab()
    for markers, name in FAMILY_TEMPLATES.items():
        if all(marker in vocabulary for marker in markers):
            return files("lacuna").joinpath("templates", name).read_text(encoding="utf-8")
    raise LacunaError(
        "tokenizer is none of ChatML, Qwen3, Llama-3, Gemma 3 or Mistral; pass --chat-template PATH with a template "
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


class SpanMarks:
    """Opens a render's {% generation %} blocks, counting them: a text with more marks than blocks holds its own."""

    blocks = 0

    def __call__(self) -> str:
        self.blocks += 1
        return SPAN_START


class GenerationSpans(Extension):
    """`{% generation %}body{% endgeneration %}` renders as SPAN_START body SPAN_END: the assistant spans are found
    in the rendered text afterwards, with no per-block bookkeeping while rendering."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return [nodes.Output([nodes.Call(nodes.Name("lacuna_start_span", "load"), [], [], None, None)], lineno=line),
                *body, nodes.Output([nodes.TemplateData(SPAN_END)], lineno=line)]


@lru_cache(maxsize=4)
def compile_template(source: str) -> Template:
    """`source` compiled in the sandboxed environment of transformers' `apply_chat_template`, with its options,
    filters and globals (taken from transformers itself), so both render the same text; generation blocks leave
    span marks (GenerationSpans)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    reference = _compile_jinja_template("").environment
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationSpans, loopcontrols])
    environment.filters["tojson"] = reference.filters["tojson"]
    environment.globals |= reference.globals
    return environment.from_string(source)


class RenderError(Exception):
    """A conversation cannot be rendered (the template raised, or the data holds span marks)."""


class Renderer:
    """Renders conversations with one chat template; a conversation's text keeps its span marks (`split_spans`)."""

    def __init__(self, source: str, variables: dict[str, Any]) -> None:
        self.template, self.variables = compile_template(source), variables
        # One context reused, emptied between conversations: what `Template.render` does, without rebuilding the
        # context (globals + variables) for every conversation, which costs more than rendering a short one.
        self.context = self.template.new_context({**variables, "messages": None, "tools": None})

    def render(self, messages: list[dict[str, Any]], tools: list | None = None,
               variables: dict[str, Any] | None = None) -> str:
        """The marked text of one conversation; `variables` (chat_template_kwargs) are added to the template's."""
        context = self.context
        if variables:  # rare: a fresh context, so these variables do not leak into the next conversation
            context = self.template.new_context({**self.variables, **variables, "messages": None, "tools": None})
        context.vars.clear(), context.exported_vars.clear()
        context.parent["messages"], context.parent["tools"] = messages, tools
        marks = context.parent["lacuna_start_span"] = SpanMarks()
        try:
            text = "".join(self.template.root_render_func(context))
        except Exception as error:  # TemplateError from raise_exception(), or any error the template runs into
            raise RenderError(f"the chat template fails on it ({type(error).__name__}: {error}): fix the record or "
                              "the template") from None
        if text.count(SPAN_START) != marks.blocks or text.count(SPAN_END) != marks.blocks:
            raise RenderError("a message contains U+FDD0/U+FDD1, Unicode noncharacters lacuna reserves for marking "
                              "assistant spans: remove them from the data")
        return text


def split_spans(marked: str) -> tuple[str, list[tuple[int, int, int]]]:
    """The text without span marks, and per {% generation %} block (position of its mark in `marked`, start, end)
    of the block's characters in the text: the assistant output that is trained on."""
    pieces = marked.split(SPAN_START)
    text, spans = [pieces[0]], []
    length = marked_length = len(pieces[0])
    for piece in pieces[1:]:
        inside, mark, after = piece.partition(SPAN_END)
        if not mark or SPAN_END in after:  # blocks always come in pairs, so only nesting breaks this
            raise LacunaError("the chat template's {% generation %} blocks are nested or unbalanced: fix the "
                              "template so each assistant reply is wrapped in exactly one block")
        spans.append((marked_length, length, length + len(inside)))
        text += (inside, after)
        length += len(inside) + len(after)
        marked_length += len(piece) + 1
    return "".join(text), spans

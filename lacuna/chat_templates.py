"""Chat templates whose assistant turns are wrapped in {% generation %} tags, for assistant-only loss masks."""

import re
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any, NamedTuple

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


class ChatTemplate(NamedTuple):
    """A chat template's source, where it comes from, and why it was chosen (printed by prepare, in the manifest)."""

    source: str
    name: str
    reason: str


def choose_template(path: str | Path | None, tokenizer: Any) -> ChatTemplate:
    """The template at `path`; else the tokenizer's own if it has {% generation %} tags (a model saved by TRL or by
    lacuna); else the packaged template of the tokenizer's chat family."""
    if path is not None:
        try:
            return ChatTemplate(Path(path).read_text(encoding="utf-8"), str(path), "given by --chat-template")
        except OSError as error:
            raise LacunaError(f"cannot read chat template {path} ({error.strerror}): check --chat-template") from None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and has_generation_tags(own):
        return ChatTemplate(own, "the tokenizer's own", "it has {% generation %} tags")
    vocabulary, why = tokenizer.get_vocab(), "no chat template" if own is None else "no {% generation %} tags"
    for markers, name in FAMILY_TEMPLATES.items():
        if all(marker in vocabulary for marker in markers):
            return ChatTemplate(files("lacuna").joinpath("templates", name).read_text(encoding="utf-8"),
                                f"lacuna/templates/{name}", f"the tokenizer has {why} of its own and holds "
                                f"{' and '.join(markers)}")
    raise LacunaError(f"the tokenizer has {why} of its own and is none of ChatML, Qwen3, Llama-3, Gemma 3 or Mistral: "
                      "pass --chat-template PATH with a template that wraps assistant replies in {% generation %}"
                      "...{% endgeneration %} tags")


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
    """`{% generation %}body{% endgeneration %}` renders as SPAN_START body SPAN_END, found in the text afterwards."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return [nodes.Output([nodes.Call(nodes.Name("lacuna_start_span", "load"), [], [], None, None)], lineno=line),
                *body, nodes.Output([nodes.TemplateData(SPAN_END)], lineno=line)]


@lru_cache(maxsize=4)
def compile_template(source: str) -> Template:
    """`source` compiled as transformers' `apply_chat_template` compiles it (both render alike), with span marks."""
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


def end_of_turn_tokens(renderer: Renderer, special: list[str]) -> set[str]:
    """The special tokens that end an assistant turn: those that first follow the replies of a two-turn probe
    conversation (gpt-oss ends a last reply with another token than an earlier one); empty if the probe fails."""
    reply = "lacuna probe reply"
    try:
        text = split_spans(renderer.render([{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": reply}] * 2))[0]
    except (RenderError, LacunaError):
        return set()
    following = [{token: piece.find(token) for token in special if token in piece} for piece in text.split(reply)[1:]]
    # the first to follow; of tokens found at the same place, the longest
    return {min(found, key=lambda token: (found[token], -len(token))) for found in following if found}

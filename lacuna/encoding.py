"""Records become documents: chat-record rules, rendering with assistant spans, tokens, loss mask and status."""

import json
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from lacuna.chat_templates import SPAN_END, SPAN_START, Renderer, RenderError, end_of_turn_tokens, split_spans
from lacuna.errors import LacunaError
from lacuna.sources import RecordBatch

ROLES = {"system": "system", "developer": "developer", "user": "user", "assistant": "assistant", "tool": "tool",
         "human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}  # + ShareGPT
SHAREGPT_KEYS = {"from": "role", "value": "content"}
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' names for a message's reasoning
LOSS_FIELDS = ("train", "weight")  # per-turn loss control (axolotl's weight): read by lacuna, not by the template
KINDS = ("with_tools", "with_reasoning", "multi_turn", "turns_excluded_train_false", "turns_excluded_last")
CHECKED_RECORDS = 1000  # the template checks run on this many first records of the first source


# What became of a document: KEPT and TRUNCATED ones are packed; DROPPED: overlong with --overlong drop; EMPTY: no
# supervised token; EXCLUDED: every assistant turn left out (train: false, --assistant-turns last). Stored as int8.
DocumentStatus = IntEnum("DocumentStatus", ["KEPT", "TRUNCATED", "DROPPED", "EMPTY", "EXCLUDED"], start=0)


class EncodedBatch(NamedTuple):
    """A batch's documents: kept tokens and masks (concatenated), kept length and status each, counts by KINDS."""

    tokens: np.ndarray
    masks: np.ndarray
    lengths: np.ndarray
    status: np.ndarray
    counts: Counter


@dataclass
class Conversation:
    """A chat record as the template sees it, with the assistant messages left out of the loss (`excluded`)."""

    messages: list[dict[str, Any]]
    tools: list | None
    variables: dict[str, Any]
    excluded: set[int]
    counts: tuple[int, ...]  # one per KINDS


def parsed(text: Any, otherwise: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError):
        return otherwise


def is_function_call(call: Any) -> bool:
    function = call.get("function", call) if isinstance(call, dict) else None  # OpenAI shape, or the bare function
    return isinstance(function, dict) and isinstance(function.get("name"), str)


def chat_message(message: Any, where: str) -> tuple[dict[str, Any], bool]:
    """One message as transformers' `apply_chat_template` passes it to the template (keys whose value is null
    dropped, reasoning under each of its names), and whether it is trained on."""
    role = (message.get("role") or message.get("from")) if isinstance(message, dict) else None
    if not isinstance(role, str) or role not in ROLES:
        raise LacunaError(f"{where}: unknown role {role!r}: use system/developer/user/assistant/tool (or ShareGPT "
                          "human/gpt/function_call/observation)")
    renamed = SHAREGPT_KEYS if "role" not in message else {}
    converted = {renamed.get(key, key): value for key, value in message.items()
                 if value is not None and key not in LOSS_FIELDS}
    converted["role"] = ROLES[role]
    if role == "function_call":  # LLaMA-Factory: the call as JSON text, {"name": ..., "arguments": ...} or a list
        calls = parsed(converted.pop("content", None), None)
        converted["tool_calls"] = [{"type": "function", "function": call}
                                   for call in (calls if isinstance(calls, list) else [calls])]
    content = converted.get("content")
    if isinstance(content, list):  # content parts: the text ones joined in order (lacuna trains text models)
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise LacunaError(f"{where}: a {role} message has a {kind!r} content part, but lacuna trains text "
                                  "models: keep only {\"type\": \"text\", \"text\": ...} parts, or remove the record")
        converted["content"] = content = "".join(part["text"] for part in content)
    if not isinstance(content, str) and (content is not None or converted["role"] != "assistant"
                                         or "tool_calls" not in converted):
        raise LacunaError(f"{where}: a {role} message has no text content: fix or remove the record")
    calls = converted.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(is_function_call(call) for call in calls)):
        raise LacunaError(f"{where}: tool_calls must be a list of function calls, e.g. [{{\"type\": \"function\", "
                          "\"function\": {\"name\": \"search\", \"arguments\": {\"query\": \"...\"}}}]: fix the record")
    for function in (call.get("function", call) for call in calls or []):
        if isinstance(function.get("arguments"), str):  # a template writes a string as is
            try:
                json.loads(function["arguments"])
            except json.JSONDecodeError as error:
                raise LacunaError(f"{where}: the arguments of tool call '{function['name']}' are not JSON "
                                  f"({error.msg}): fix the record (an object, or a JSON string of one)") from None
    reasoning = next((converted[key] for key in REASONING_FIELDS if key in converted), None)
    if reasoning is not None:  # as transformers' _alias_reasoning_fields: templates read one name or the other
        converted = {"thinking": reasoning, **converted, "reasoning_content": reasoning}
    train, weight = message.get("train", True), message.get("weight", 1)
    if not isinstance(train, bool) or weight not in (0, 1):
        raise LacunaError(f"{where}: a message's train must be true or false and its weight 0 or 1 (got {train!r}, "
                          f"{weight!r}): fix the record")
    return converted, train and weight == 1


class Completion(NamedTuple):
    """A standard (plain-text) prompt–completion record, as TRL trains it: the completion supervised, EOS appended."""

    prompt: str
    completion: str


def read_record(record: Any, field: str, where: str, sft: bool = False) -> tuple[dict[str, Any], Any]:
    """A record (a JSON line, or a dict of columns) and its `field` (None: a prompt–completion record in `sft`)."""
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as error:
            raise LacunaError(f"{where}: malformed JSON ({error.msg}): fix or remove that line") from None
    if not isinstance(record, dict):
        raise LacunaError(f"{where}: expected a JSON object, got {type(record).__name__}: fix the record")
    if field == "messages" and field not in record and "conversations" in record:
        field = "conversations"
    if field not in record and not (sft and "prompt" in record and "completion" in record):
        shapes = f"neither '{field}' nor 'prompt' and 'completion'" if sft else f"no field '{field}'"
        raise LacunaError(f"{where} has {shapes} (fields: {', '.join(record)}): pass --text-field NAME (pretrain) or "
                          "--messages-field NAME (sft)")
    return record, record.get(field)


def conversation(record: Any, messages_field: str, assistant_turns: str, where: str) -> Conversation | Completion:
    """A record as a Conversation (a prompt–completion one: the prompt's replies are context), or a Completion."""
    record, messages = read_record(record, messages_field, where, sft=True)
    context = 0  # messages before the completion
    if messages is None:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return Completion(prompt, completion)
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise LacunaError(f"{where}: prompt and completion must both be text or both lists of messages (got "
                              f"{type(prompt).__name__} and {type(completion).__name__}): fix the record")
        messages, context = prompt + completion, len(prompt)
    if not isinstance(messages, list) or not messages:
        raise LacunaError(f"{where}: expected a list of messages, got "
                          f"{'an empty list' if messages == [] else type(messages).__name__}: fix the record")
    converted, trained = zip(*(chat_message(message, where) for message in messages), strict=True)
    assistants = [index for index, message in enumerate(converted) if message["role"] == "assistant"]
    if not assistants or assistants[-1] < context:
        raise LacunaError(f"{where}: {'completion' if context else 'conversation'} has no assistant turn, so nothing "
                          "to learn: remove it")
    in_prompt = {index for index in assistants if index < context}
    excluded = {index for index in assistants if not trained[index]} - in_prompt
    by_last = set(assistants[:-1]) - excluded - in_prompt if assistant_turns == "last" else set()
    tools = record.get("tools")
    if isinstance(tools, str):  # not JSON: left a string, so the error below
        tools = parsed(tools, tools) if tools.strip() else None
    if tools is not None and not isinstance(tools, list):
        raise LacunaError(f"{where}: tools is neither a list of JSON schemas nor a JSON string of one: fix the record")
    variables = record.get("chat_template_kwargs") or {}
    if not isinstance(variables, dict):
        raise LacunaError(f"{where}: chat_template_kwargs must be an object of template variables, e.g. "
                          "{\"enable_thinking\": false}: fix the record")
    counts = (bool(tools) or any("tool_calls" in m or m["role"] == "tool" for m in converted),
              any("reasoning_content" in message for message in converted), len(assistants) > 1, len(excluded),
              len(by_last))
    return Conversation(list(converted), tools, variables, excluded | by_last | in_prompt, counts)


def trained_spans(renderer: Renderer, chat: Conversation, marked: str, blocks: list[tuple[int, int, int]]
                  ) -> list[tuple[int, int]]:
    """The spans of the trained turns. A block belongs to the last assistant message that starts before it; where a
    message starts is found by rendering the conversation up to it, which must be a prefix of the whole."""
    cuts, trained_after = [], []
    for index, message in enumerate(chat.messages):
        trained = index not in chat.excluded
        if message["role"] == "assistant" and (not trained_after or trained != trained_after[-1]):
            prefix = renderer.render(chat.messages[:index], chat.tools, chat.variables) if cuts else ""
            if not marked.startswith(prefix):
                raise RenderError("the chat template renders earlier turns differently once later turns follow, "
                                  "so the turns left out by train: false / --assistant-turns last cannot be told "
                                  "apart: use a prefix-preserving template (lacuna's own are)")
            cuts.append(len(prefix)), trained_after.append(trained)
    return [(start, end) for mark, start, end in blocks if trained_after[bisect_right(cuts, mark) - 1]]


@dataclass
class Encoder:
    """Turns a batch of records into documents: tokens, loss mask (first token masked), status."""

    mode: str
    tokenizer: Any
    template: str | None
    seq_len: int
    overlong: str
    dtype: np.dtype
    field: str = "messages"
    assistant_turns: str = "all"
    template_name: str = "(default)"
    renderer: Renderer | None = None

    def pretrain_documents(self, numbered: list[tuple[int, Any]], where: str) -> tuple[np.ndarray, ...]:
        records = [read_record(record, self.field, where.format(number))[1] for number, record in numbered]
        for (number, _), record in zip(numbered, records, strict=True):
            if not isinstance(record, str):
                raise LacunaError(f"{where.format(number)}: text is {type(record).__name__}, not a string: fix or "
                                  "remove the record")
        # the same encode_batch transformers calls, minus its offsets and Python wrapping
        encodings = self.tokenizer.backend_tokenizer.encode_batch_fast(records, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        lengths = np.array([len(sequence) for sequence in ids], np.int64) + 1 + (bos is not None)
        ends = np.cumsum(lengths)
        tokens = np.empty(int(lengths.sum()), self.dtype)
        is_text = np.ones(len(tokens), bool)  # the positions between the BOS and EOS of each document
        for position, token in ((ends - lengths, bos), (ends - 1, eos)):
            if token is not None:
                tokens[position], is_text[position] = token, False
        tokens[is_text] = np.fromiter(chain.from_iterable(ids), self.dtype, count=int(is_text.sum()))
        return tokens, np.ones(len(tokens), np.uint8), lengths, np.zeros(len(lengths), bool)

    def sft_documents(self, numbered: list[tuple[int, Any]], where: str, check: bool = False) -> tuple[Any, ...]:
        """Rendering with assistant spans, one batched tokenization, and a token supervised when its characters
        overlap a span, as transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` decides."""
        if self.renderer is None:
            variables = {**self.tokenizer.special_tokens_map, "documents": None, "add_generation_prompt": False}
            self.renderer = Renderer(self.template, variables)
        chats = [conversation(record, self.field, self.assistant_turns, where.format(number))
                 for number, record in numbered]
        texts, marked_texts, bases, bounds, excluded = [], [], [0], [], []
        for (number, _), chat in zip(numbered, chats, strict=True):
            text, marked, found = self.spans(chat, where.format(number))
            # every text and its spans laid on one line of characters, so one search finds each token's span
            bounds += [(bases[-1] + start, bases[-1] + end) for start, end in found]
            texts.append(text), marked_texts.append(marked), bases.append(bases[-1] + len(text))
            excluded.append(not found and bool(chat.excluded))
        tallies = np.array([chat.counts for chat in chats if isinstance(chat, Conversation)], np.int64)
        counts = Counter(dict(zip(KINDS, tallies.reshape(-1, len(KINDS)).sum(axis=0).tolist(), strict=True)))
        if check:
            counts.update(self.check_template(chats, marked_texts, numbered))
        plain = [isinstance(chat, Completion) for chat in chats]  # tokenized as TRL does: with special tokens
        encoded = {flag: iter(self.tokenizer.backend_tokenizer.encode_batch(
            [text for text, kind in zip(texts, plain, strict=True) if kind == flag], add_special_tokens=flag))
            for flag in set(plain)}
        encodings = [next(encoded[flag]) for flag in plain]
        lengths = np.array([len(encoding.ids) for encoding in encodings], np.int64)
        tokens = np.fromiter(chain.from_iterable(encoding.ids for encoding in encodings), self.dtype,
                             count=int(lengths.sum()))
        offsets = np.fromiter(chain.from_iterable(chain.from_iterable(encoding.offsets for encoding in encodings)),
                              np.int64, count=2 * len(tokens)).reshape(-1, 2)
        offsets += np.repeat(np.array(bases[:-1], np.int64), lengths)[:, None]
        spans = np.array(bounds, np.int64).reshape(-1, 2)
        span = np.searchsorted(spans[:, 1], offsets[:, 0], side="right")  # the first span ending after its start
        inside = span < len(spans)
        masks = np.zeros(len(tokens), np.uint8)
        masks[inside] = offsets[inside, 1] > spans[span[inside], 0]
        return tokens, masks, lengths, np.array(excluded, bool), counts

    def spans(self, chat: Conversation | Completion, where: str) -> tuple[str, str | None, list[tuple[int, int]]]:
        """A record's text, its marked text (None for a Completion) and the character spans trained on."""
        if isinstance(chat, Completion):  # TRL appends the EOS (unless there) and trains on it
            eos = self.tokenizer.eos_token
            text = chat.prompt + chat.completion + ("" if chat.completion.endswith(eos) else eos)
            return text, None, [(len(chat.prompt), len(text))]
        try:
            marked = self.renderer.render(chat.messages, chat.tools, chat.variables)
            text, blocks = split_spans(marked)
            return text, marked, trained_spans(self.renderer, chat, marked, blocks)
        except RenderError as error:
            raise LacunaError(f"{where}: {error}") from None

    def check_template(self, chats: list[Conversation], marked_texts: list[str], numbered: list) -> dict[str, int]:
        """Refuse end-of-turn tokens after generation blocks; count multi-turn conversations checked and differing."""
        special = [token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special]
        end_tokens = end_of_turn_tokens(self.renderer, special) or {self.tokenizer.eos_token}
        checked, differing = 0, 0
        for (number, _), chat, marked in zip(numbered, chats, marked_texts, strict=True):
            if number > CHECKED_RECORDS or marked is None:  # marked is None: plain text, no template
                continue
            for piece in marked.split(SPAN_START)[1:]:
                inside, _, after = piece.partition(SPAN_END)
                inside, after = inside.rstrip(), after.lstrip()  # TRL's templates end the block with "<|im_end|>\n"
                if left := next((token for token in end_tokens if after.startswith(token)
                                 and not inside.endswith(token)), None):
                    raise LacunaError(f"chat template {self.template_name} leaves the end-of-turn token {left} after "
                                      "an assistant reply outside its {% generation %} block, so the model would "
                                      f"never learn to stop: move {left} inside the block")
            ends = [index + 1 for index, message in enumerate(chat.messages[:-1]) if message["role"] == "assistant"]
            checked += bool(ends)
            differing += any(not marked.startswith(self.renderer.render(chat.messages[:end], chat.tools,
                                                                        chat.variables)) for end in ends)
        return {"prefix_checked": checked, "not_prefix_preserving": differing}

    def __call__(self, batch: RecordBatch) -> EncodedBatch:
        where = f"{batch.origin} record #{{}}"
        numbered = [(batch.first + index + 1, record) for index, record in enumerate(batch.records)
                    if not (isinstance(record, str) and not record.strip())]  # blank JSON lines hold no record
        if self.mode == "pretrain":
            return EncodedBatch(*self.finish(*self.pretrain_documents(numbered, where)), Counter())
        checked = batch.source == 0 and batch.file == 0 and batch.first < CHECKED_RECORDS  # whatever the processes
        tokens, masks, lengths, excluded, counts = self.sft_documents(numbered, where, checked)
        return EncodedBatch(*self.finish(tokens, masks, lengths, excluded), counts)

    def finish(self, tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray, excluded: np.ndarray
               ) -> tuple[np.ndarray, ...]:
        """Mask document starts, apply --overlong, set statuses; returns kept tokens, masks, lengths, statuses."""
        starts = np.cumsum(lengths) - lengths
        masks[starts[lengths > 0]] = 0  # no target across a document boundary
        status, kept = np.full(len(lengths), DocumentStatus.KEPT, np.int8), lengths.copy()
        if self.mode == "sft":
            overlong = lengths > self.seq_len
            status[overlong] = DocumentStatus.TRUNCATED if self.overlong == "truncate" else DocumentStatus.DROPPED
            kept[overlong] = self.seq_len if self.overlong == "truncate" else 0
        supervised_before = np.concatenate([[0], np.cumsum(masks, dtype=np.int64)])
        has_target = supervised_before[starts + kept] > supervised_before[starts]  # truncated: the kept part counts
        empty = (status != DocumentStatus.DROPPED) & ~has_target
        status[empty], kept[empty] = DocumentStatus.EMPTY, 0
        status[excluded], kept[excluded] = DocumentStatus.EXCLUDED, 0
        if (kept == lengths).all():
            return tokens, masks, kept, status
        document = np.repeat(np.arange(len(lengths)), lengths)
        keep = np.arange(len(tokens)) - starts[document] < kept[document]
        return tokens[keep], masks[keep], kept, status

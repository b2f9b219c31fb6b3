"""Records become documents: the chat-record rules (roles, fields), chat-template rendering with assistant spans,
batched tokenization and the loss mask, and each document's status (kept, truncated, dropped, empty mask)."""

from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from lacuna.chat_templates import RenderError, render_conversations
from lacuna.errors import LacunaError

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
KEPT, TRUNCATED, DROPPED, EMPTY = 0, 1, 2, 3  # per-document status


@dataclass
class Encoder:
    """Turns a batch of records into documents: tokens, loss mask (first token masked), status."""

    mode: str
    tokenizer: Any
    template: str | None
    seq_len: int
    overlong: str
    dtype: np.dtype
    specs: list[str]

    def conversation(self, record: Any, where: str) -> list[dict[str, str]]:
        if not isinstance(record, list) or not record:
            raise LacunaError(f"{where}: expected a list of messages, got {type(record).__name__}: fix the record")
        messages = []
        for message in record:
            message = message if isinstance(message, dict) else {}
            role = message.get("role") or message.get("from")
            content = message["content"] if message.get("content") is not None else message.get("value")
            if not isinstance(role, str) or role not in ROLES:
                raise LacunaError(f"{where}: unknown role {role!r}: use system/user/assistant (or ShareGPT human/gpt)")
            if not isinstance(content, str):
                raise LacunaError(f"{where}: a {role} message has no text content: fix or remove the record")
            messages.append({"role": ROLES[role], "content": content})
        if not any(message["role"] == "assistant" for message in messages):
            raise LacunaError(f"{where}: conversation has no assistant turn, so nothing to learn: remove it")
        return messages

    def pretrain_documents(self, records: list, where: str, first: int) -> tuple[np.ndarray, ...]:
        for index, record in enumerate(records):
            if not isinstance(record, str):
                raise LacunaError(f"{where.format(first + index + 1)}: text is {type(record).__name__}, not a "
                                  "string: fix or remove the record")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the same encode_batch transformers calls, minus its offsets and Python wrapping
            ids = [encoding.ids for encoding in backend.encode_batch_fast(records, add_special_tokens=False)]
        else:
            ids = self.tokenizer(records, add_special_tokens=False, verbose=False)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        lengths = np.array([len(sequence) for sequence in ids], np.int64) + 1 + (bos is not None)
        ends = np.cumsum(lengths)
        tokens = np.empty(int(lengths.sum()), self.dtype)
        is_text = np.ones(len(tokens), bool)  # the positions between the BOS and EOS of each document
        for position, token in ((ends - lengths, bos), (ends - 1, eos)):
            if token is not None:
                tokens[position], is_text[position] = token, False
        tokens[is_text] = np.fromiter(chain.from_iterable(ids), self.dtype, count=int(is_text.sum()))
        return tokens, np.ones(len(tokens), np.uint8), lengths

    def sft_documents(self, records: list, where: str, first: int) -> tuple[np.ndarray, ...]:
        """Chat-template rendering with assistant spans, one batched tokenization, and the spans mapped to tokens:
        a token is supervised when it covers a character of an assistant span (transformers' char_to_token rule)."""
        conversations = [self.conversation(record, where.format(first + index + 1))
                         for index, record in enumerate(records)]
        variables = {**self.tokenizer.special_tokens_map, "tools": None, "documents": None,
                     "add_generation_prompt": False}
        try:
            texts, spans = render_conversations(self.template, conversations, variables)
        except RenderError as error:
            raise LacunaError(f"{where.format(first + error.index + 1)}: {error}") from None
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        sequences = [encoding.ids for encoding in encodings]
        lengths = np.array([len(sequence) for sequence in sequences], np.int64)
        changes = np.zeros(lengths.sum() + 1, np.int32)  # +1 where a supervised run starts, -1 after it ends
        for offset, encoding, found in zip((np.cumsum(lengths) - lengths).tolist(), encodings, spans, strict=True):
            for start, end in found:
                first_token = covering_token(encoding, range(start, end))
                if first_token is not None:
                    changes[offset + first_token] += 1
                    changes[offset + covering_token(encoding, range(end - 1, start - 1, -1)) + 1] -= 1
        tokens = np.fromiter(chain.from_iterable(sequences), self.dtype, count=int(lengths.sum()))
        return tokens, (np.cumsum(changes[:-1]) > 0).astype(np.uint8), lengths

    def __call__(self, batch: tuple[int, int, list]) -> tuple[np.ndarray, ...]:
        source_index, first, records = batch
        where = f"dataset '{self.specs[source_index]}' record #{{}}"
        documents = self.pretrain_documents if self.mode == "pretrain" else self.sft_documents
        return self.finish(*documents(records, where, first))

    def finish(self, tokens: np.ndarray, masks: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Mask each document's first token, apply --overlong, mark documents without targets; returns the kept
        tokens and masks (concatenated) with each document's kept length and status."""
        starts = np.cumsum(lengths) - lengths
        masks[starts[lengths > 0]] = 0  # no target across a document boundary
        status, kept = np.full(len(lengths), KEPT, np.int8), lengths.copy()
        if self.mode == "sft":
            overlong = lengths > self.seq_len
            status[overlong] = TRUNCATED if self.overlong == "truncate" else DROPPED
            kept[overlong] = self.seq_len if self.overlong == "truncate" else 0
        has_target, positive = np.zeros(len(lengths), bool), lengths > 0
        if positive.any():
            has_target[positive] = np.maximum.reduceat(masks, starts[positive]) > 0
        for index in np.flatnonzero((kept > 0) & (kept < lengths)):  # truncated: only the kept part counts
            has_target[index] = masks[starts[index]:starts[index] + kept[index]].any()
        empty = (status != DROPPED) & ~has_target
        status[empty], kept[empty] = EMPTY, 0
        if (kept == lengths).all():
            return tokens, masks, kept, status
        document = np.repeat(np.arange(len(lengths)), lengths)
        keep = np.arange(len(tokens)) - starts[document] < kept[document]
        return tokens[keep], masks[keep], kept, status


def covering_token(encoding: Any, characters: range) -> int | None:
    """The first token, in the order of `characters`, that covers one of them (None: none does)."""
    for character in characters:
        token = encoding.char_to_token(character)
        if token is not None:
            return token
    return None

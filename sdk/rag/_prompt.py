"""A RAG prompt as chunks: the model's chat template with the documents in the system
message, cut where the documents start and end, so every document is one chunk whose
tokens do not depend on its neighbours or its place (a chunk key reuses it anywhere).

    head  = template text up to the documents (system preamble)          -> chunk 0
    doc i = the document's text and its separator, tokenized alone       -> chunk i + 1
    tail  = the rest: end of the system message, the question, the generation prompt

``Prompt.ids`` (head + docs + tail) is the prompt every mode sees, full prefill included:
it decodes to exactly the template's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvfuse._errors import InvalidValueError

SYSTEM = "Answer the question using only the documents below. Reply with the answer only."
SEPARATOR = "\n\n"
_MARK = "\x00kvfuse-documents\x00"


@dataclass(frozen=True)
class Prompt:
    """A prompt in chunks (token ids): ``head``, one chunk per document, ``tail``."""

    head: list[int]
    docs: list[list[int]]
    tail: list[int]

    @property
    def chunks(self) -> list[list[int]]:
        """What the store holds: the head (computed alone at 0), then each document."""
        return [self.head, *self.docs]

    @property
    def ids(self) -> list[int]:
        return [t for c in self.chunks for t in c] + self.tail


def document_text(doc: str) -> str:
    """A document as it sits in the system message (its separator included)."""
    return doc.strip() + SEPARATOR


def build_prompt(tokenizer: Any, docs: Sequence[str], question: str, system: str = SYSTEM) -> Prompt:
    """The chat-template prompt of ``question`` over ``docs`` (in the given order)."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidValueError("question", "a non-empty string", repr(question)[:40])
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise InvalidValueError("docs", "a list of strings", type(docs).__name__)
    messages = [
        {"role": "system", "content": system + SEPARATOR + _MARK},
        {"role": "user", "content": question},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(_MARK) != 1:
        raise InvalidValueError(
            "tokenizer", "a chat template that keeps the system message's text", "one that does not"
        )
    before, after = text.split(_MARK)

    def encode(s: str) -> list[int]:
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])

    return Prompt(encode(before), [encode(document_text(d)) for d in docs], encode(after))

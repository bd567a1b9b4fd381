"""EditRequest (a fact to write) and the subject-token lookup ROME uses.

The lookup works on the tokenisation of the whole prompt, so leading spaces and merges are
exactly what the model sees: a token belongs to the subject when its character span overlaps the
subject's span. The subject must start on a token boundary; its last token may merge with what
follows (``"Comic High!"`` then ``","`` gives ``"!,"``), and that merged token is the lookup, as
in ROME's ``repr_tools.get_words_idxs_in_templates`` (which counts the tokens of prefix and
subject alone).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping

from rome_jax.models.tokenizer import Tokenizer

FACT_TOKENS = ("subject_last", "subject_first", "last")


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """``prompt`` holds one ``{}`` for ``subject``; the model should continue it with
    ``target_new`` (``target_true`` is the old object, used for reporting only)."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new", "target_true"):
            value = getattr(self, name)
            if value is None and name == "target_true":
                continue
            if not isinstance(value, str):
                raise ValueError(f"{name}: must be a string, got {type(value).__name__} "
                                 f"{value!r}")
            if not value.strip():
                raise ValueError(f"{name}: must be a non-empty string")
        if self.prompt.count("{}") != 1:
            raise ValueError(f"prompt: must contain exactly one '{{}}' for the subject, got "
                             f"{self.prompt!r}")
        if "{" in self.prompt.replace("{}", "") or "}" in self.prompt.replace("{}", ""):
            raise ValueError(f"prompt: stray brace in {self.prompt!r}")
        if self.case_id is not None and (isinstance(self.case_id, bool) or not isinstance(
                self.case_id, numbers.Integral)):
            raise ValueError(f"case_id: must be an integer, got {type(self.case_id).__name__} "
                             f"{self.case_id!r}")
        if self.case_id is not None:
            object.__setattr__(self, "case_id", int(self.case_id))

    @property
    def text(self) -> str:
        """The prompt with its subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def subject_first(self) -> bool:
        """The subject opens the prompt (the collapse-prone case)."""
        return self.prompt.startswith("{}")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "EditRequest":
        """From a CounterFact record, its ``requested_rewrite``, or a flat dict; targets may be
        strings or ``{"str": ...}``."""
        if not isinstance(record, Mapping):
            raise ValueError(f"request: expected a JSON object, got {type(record).__name__}")
        rw = record.get("requested_rewrite", record)
        if not isinstance(rw, Mapping):
            raise ValueError(f"requested_rewrite: expected a JSON object, got "
                             f"{type(rw).__name__}")
        missing = [f for f in ("prompt", "subject", "target_new") if f not in rw]
        if missing:
            raise ValueError(f"{missing[0]}: missing from the request")

        def text(name):
            value = rw.get(name)
            if isinstance(value, Mapping):
                if "str" not in value:
                    raise ValueError(f"{name}: expected a string or {{\"str\": ...}}, got an "
                                     f"object without \"str\" ({sorted(value)})")
                return value["str"]
            return value

        return cls(prompt=rw["prompt"], subject=rw["subject"], target_new=text("target_new"),
                   target_true=text("target_true"), case_id=record.get("case_id"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def subject_token_index(tokenizer: Tokenizer, template: str, subject: str,
                        fact_token: str = "subject_last") -> tuple[list[int], int]:
    """Token ids of ``template.format(subject)`` as a whole sequence (after the tokenizer's
    start token, if any) and the lookup position in them.

    ``fact_token``: ``subject_last`` (ROME's default: the token holding the subject's last
    character), ``subject_first`` or ``last`` (the last token of the prompt). Raises ValueError
    when the subject does not start on a token boundary (ROME would count its tokens wrongly).
    """
    encoding = tokenizer.backend.encode(template.format(subject), add_special_tokens=False)
    return subject_lookup(tokenizer, encoding, template, subject, fact_token)


def subject_lookup(tokenizer: Tokenizer, encoding, template: str, subject: str,
                   fact_token: str) -> tuple[list[int], int]:
    """``subject_token_index`` of an ``encoding`` of ``template.format(subject)`` already
    made (``tokenizer.backend.encode_batch`` encodes many at once)."""
    if fact_token not in FACT_TOKENS:
        raise ValueError(f"fact_token: {fact_token!r} is not one of {FACT_TOKENS}")
    start = template.index("{}")
    text = template.format(subject)
    shift = len(tokenizer.start_ids)
    ids = tokenizer.start_ids + encoding.ids
    if fact_token == "last":
        return ids, len(ids) - 1
    lo, hi = start, start + len(subject.rstrip())
    inside = [i for i, (a, b) in enumerate(encoding.offsets) if a < hi and b > lo]
    if not inside:
        raise ValueError(f"subject: {subject!r} does not tokenise inside the prompt {text!r}")
    first, last = inside[0], inside[-1]
    a = encoding.offsets[first][0]
    if text[a:lo].strip():
        raise ValueError(f"subject: {subject!r} does not start on a token boundary in the "
                         f"prompt {text!r} (its first token is {text[a:encoding.offsets[first][1]]!r})")
    return ids, shift + (first if fact_token == "subject_first" else last)

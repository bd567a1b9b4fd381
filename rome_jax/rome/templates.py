"""Context templates: ``"{}"`` plus short prefixes the model writes itself (ROME's k̄ averages
the key over them). Sampled once per model from an explicit ``jax.random`` key, or given.

Two samplers, as in the original code (its ``generate_fast``: top-k 5, ``max_out_len`` counting
the prompt token, the text NFKD-normalised, ``"\\n\\n"`` -> ``" "`` and ``<|endoftext|>`` removed,
here every special token):

* ``"rome"`` (kmeng01/rome ``get_context_templates``): every prefix continues the document
  separator ``<|endoftext|>`` alone, ``count`` prefixes of ``length - 1`` new tokens each;
* ``"memit"`` (MEMIT's): prefixes open with "The", "Therefore", "Because", "I", "You",
  ``count // 5`` each, ``length`` tokens with the opening word.

Braces are removed from the text (MEMIT's ``replace``; ROME has none, and a generated brace
would break its ``format``).
"""

from __future__ import annotations

import dataclasses
import unicodedata

import jax

from rome_jax.models.generate import generate_ids
from rome_jax.models.model import Model
from rome_jax.models.tokenizer import EOS_TOKEN

# ROME's context_template_length_params: (length, count) = 10 prefixes of 5 and 10 of 10 tokens.
DEFAULT_LENGTHS = ((5, 10), (10, 10))
MEMIT_OPENINGS = ("The", "Therefore", "Because", "I", "You")
STYLES = ("rome", "memit")


@dataclasses.dataclass(frozen=True)
class ContextTemplates:
    """``templates[0] == "{}"``; the others are ``"<prefix>. {}"``."""

    templates: tuple[str, ...]

    def __post_init__(self):
        if not self.templates or self.templates[0] != "{}":
            raise ValueError("templates: the first context template must be '{}'")
        bad = [t for t in self.templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"templates: each needs exactly one '{{}}', not {bad[0]!r}")

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The prefixes alone (every template but the plain one, without ``{}``)."""
        return tuple(t.replace("{}", "") for t in self.templates[1:])

    def apply(self, prompt: str) -> list[str]:
        """The request prompt inside every template: ``[t.format(prompt) ...]``."""
        return [t.replace("{}", prompt) for t in self.templates]


def _clean(text: str) -> str:
    """generate_fast's text clean-up, and the braces removed."""
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return text.replace("{", "").replace("}", "")


def sample_context_templates(model: Model, key: jax.Array,
                             lengths: tuple[tuple[int, int], ...] = DEFAULT_LENGTHS,
                             top_k: int = 5, style: str = "rome") -> ContextTemplates:
    """For each (length, count) of ``lengths``: ``count`` prefixes sampled top-k from the
    model with ``key`` (see the module docstring for ``style``). Each generation reads the
    tokenizer's start token first when the model has one (``Model.with_bos``)."""
    if style not in STYLES:
        raise ValueError(f"context_templates: {style!r} is not one of {', '.join(STYLES)}")
    tok = model.tokenizer
    if style == "rome":
        try:
            separator = tok.token_id(EOS_TOKEN)
        except ValueError:
            raise ValueError(f"context_templates: 'rome' samples from {EOS_TOKEN!r}, which this "
                             "tokenizer lacks; use 'memit' or give the templates") from None
    templates = ["{}"]
    for (length, count), sub in zip(lengths, jax.random.split(key, len(lengths))):
        if style == "rome":
            openings = [""] * count
            sequences = [tok.start_ids + [separator]] * count
        else:
            openings = [w for w in MEMIT_OPENINGS for _ in range(count // len(MEMIT_OPENINGS))]
            sequences = tok.encode_sequences(openings)
        new = generate_ids(model, sequences, length - 1, key=sub, top_k=top_k)
        for opening, row in zip(openings, new):
            text = opening + tok.decode(row, skip_special_tokens=True)
            templates.append(_clean(text) + ". {}")
    return ContextTemplates(tuple(templates))


def with_test_prefix(prompt: str, subject: str, prefix: str) -> str:
    """The "Fall of ROME" test-time fix: a prompt that opens with its subject gets ``prefix``
    (e.g. ``context.templates.prefixes[0]``) in front, so the model reads the subject with the
    kind of context it was edited with; other prompts are returned unchanged."""
    return prefix + prompt if prompt.startswith(subject) else prompt

"""Context templates: ``"{}"`` plus short prefixes the model writes itself (ROME's k̄ averages
the key over them). Sampled once per model from an explicit ``jax.random`` key, or given."""

from __future__ import annotations

import dataclasses

import jax

from rome_jax.models.generate import generate
from rome_jax.models.model import Model

# ROME: 10 prefixes of 5 tokens and 10 of 10 tokens, top-k 5, from these opening words.
DEFAULT_LENGTHS = ((5, 10), (10, 10))
OPENINGS = ("The", "Therefore", "Because", "I", "You")


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


def sample_context_templates(model: Model, key: jax.Array,
                             lengths: tuple[tuple[int, int], ...] = DEFAULT_LENGTHS,
                             top_k: int = 5) -> ContextTemplates:
    """For each (length, count): ``count`` prefixes of ``length`` tokens (the opening word
    included), ``count // 5`` per opening word, sampled top-k from the model."""
    templates = ["{}"]
    for (length, count), sub in zip(lengths, jax.random.split(key, len(lengths))):
        openings = [w for w in OPENINGS for _ in range(count // len(OPENINGS))]
        texts = generate(model, openings, max_new_tokens=length - 1, key=sub, top_k=top_k)
        for opening, text in zip(openings, texts):
            prefix = (opening + text).replace("{", " ").replace("}", " ")
            templates.append(prefix + ". {}")
    return ContextTemplates(tuple(templates))

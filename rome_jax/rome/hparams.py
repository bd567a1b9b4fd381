"""ROME hyper-parameters, with the paper's presets and one for the embedded default model."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Mapping

from rome_jax.models.config import ModelConfig
from rome_jax.rome.request import FACT_TOKENS
from rome_jax.rome.templates import MEMIT_OPENINGS
from rome_jax.rome.templates import STYLES as TEMPLATE_STYLES


CLAMP_REFERENCES = ("mlp_output", "residual")


@dataclasses.dataclass(frozen=True)
class RomeHParams:
    """Names follow the ROME code. ``layer`` is ROME's ``layers[0]``; ``v_loss_layer`` None means
    the last block (the only one ROME's presets use). ``context_templates``: how the templates
    are sampled, ``"rome"`` (from ``<|endoftext|>``, ROME's) or ``"memit"`` (from MEMIT's opening
    words); see ``rome/templates.py``. ``clamp_reference``: the vector whose norm scales the clamp
    on ‖δ‖ and the weight decay, ``"mlp_output"`` (ROME's v_init, the MLP output at the plain
    prompt's lookup token) or ``"residual"`` (MEMIT's target_init, the residual stream leaving the
    layer there)."""

    layer: int
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    context_template_length_params: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_templates: str = "rome"
    mom2_corpus: str = "wikitext"
    mom2_n_samples: int | None = None
    mom2_ridge: float = 0.0
    clamp_reference: str = "mlp_output"

    def __post_init__(self):
        """ValueError naming the field for a wrong type or range; floats are stored as float and
        the template lengths as a tuple of (length, count) pairs."""
        for name, low, optional in (("layer", 0, False), ("v_num_grad_steps", 1, False),
                                    ("v_loss_layer", 0, True), ("mom2_n_samples", 1, True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not _integer(value, low):
                raise ValueError(f"{name}: must be an integer >= {low}"
                                 f"{' or None' if optional else ''}, got {value!r}")
            object.__setattr__(self, name, int(value))
        check_numbers(self, (("v_lr", True), ("v_weight_decay", False), ("kl_factor", False),
                             ("clamp_norm_factor", True), ("early_stop_loss", False),
                             ("mom2_ridge", False)))
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token: {self.fact_token!r} is not one of {FACT_TOKENS}")
        if self.context_templates not in TEMPLATE_STYLES:
            raise ValueError(f"context_templates: {self.context_templates!r} is not one of "
                             f"{', '.join(TEMPLATE_STYLES)}")
        if self.clamp_reference not in CLAMP_REFERENCES:
            raise ValueError(f"clamp_reference: {self.clamp_reference!r} is not one of "
                             f"{', '.join(CLAMP_REFERENCES)}")
        if not isinstance(self.mom2_corpus, str) or not self.mom2_corpus:
            raise ValueError(f"mom2_corpus: must be a non-empty string, got "
                             f"{self.mom2_corpus!r}")
        pairs = self.context_template_length_params
        pairs = tuple(pairs) if isinstance(pairs, (tuple, list)) else None
        if pairs is None or not all(isinstance(pair, (tuple, list)) and len(pair) == 2
                                    and all(_integer(x, 1) for x in pair) for pair in pairs):
            raise ValueError(f"context_template_length_params: must be (length, count) pairs "
                             f"of positive integers, got "
                             f"{self.context_template_length_params!r}")
        object.__setattr__(self, "context_template_length_params",
                           tuple((int(n), int(k)) for n, k in pairs))
        if self.context_templates == "memit" and any(
                k % len(MEMIT_OPENINGS) for _, k in self.context_template_length_params):
            raise ValueError(f"context_template_length_params: MEMIT's templates take one count "
                             f"per opening word ({len(MEMIT_OPENINGS)}), so each count must be a "
                             f"multiple of {len(MEMIT_OPENINGS)}, got "
                             f"{self.context_template_length_params!r}")

    def check(self, config: ModelConfig) -> "RomeHParams":
        config.check_layer(self.layer)
        if self.v_loss_layer not in (None, config.n_layer - 1):
            raise ValueError(f"v_loss_layer: only the last layer ({config.n_layer - 1}) is "
                             f"supported, got {self.v_loss_layer}")
        return self

    def replace(self, **changes) -> "RomeHParams":
        return dataclasses.replace(self, **changes)


def filled(saved: Mapping) -> dict:
    """The ROME settings a results file saved (``RomeHParams`` as JSON: journals, screens,
    evaluations), the fields it lacks set to their defaults as JSON reads them back: a file
    written before a field existed was made with the field's default, so two files' settings
    agree when their filled dicts are equal."""
    defaults = {f.name: f.default for f in dataclasses.fields(RomeHParams)
                if f.default is not dataclasses.MISSING}
    return {**json.loads(json.dumps(defaults)), **saved}


def check_numbers(hparams, fields) -> None:
    """Each (name, positive) of ``fields`` of the frozen dataclass ``hparams`` must be a finite
    real >= 0 (> 0 when positive), and is stored as float; ValueError naming the field."""
    for name, positive in fields:
        value = getattr(hparams, name)
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(value) or value < 0 or (positive and value == 0)):
            raise ValueError(f"{name}: must be a finite number "
                             f"{'> 0' if positive else '>= 0'}, got {value!r}")
        object.__setattr__(hparams, name, float(value))


def _integer(value, low: int) -> bool:
    """``value`` is an integer (not a bool) >= ``low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


# The ROME paper's settings (kmeng01/rome hparams/ROME; GPT-J as in its paper table, which the
# EasyEdit port also uses).
PRESETS = {
    "gpt2-medium": RomeHParams(layer=8),
    "gpt2-large": RomeHParams(layer=12),
    "gpt2-xl": RomeHParams(layer=17),
    "gpt-j-6b": RomeHParams(layer=5),
    # The embedded default (6 layers): layer 2 sits where ROME's layers sit in GPT-2 XL (17/48).
    "gpt2-cf-tiny": RomeHParams(layer=2),
    # SmolLM2-135M(-Instruct), 30 layers: the mean causal trace of 16 known CounterFact facts
    # (scripts/trace_layers.py, docs/trace_smollm2.png) peaks at layer 4 for the MLP outputs at
    # the last subject token, as ROME chose GPT-2 XL's layer 17; the other settings are ROME's
    # GPT-J ones (the defaults), with C over all of WikiText-2.
    "smollm2-135m": RomeHParams(layer=4),
    # Gemma 3 270M (18 layers; opt-in, read with its <bos>): the same trace over 20 known facts
    # (docs/trace_gemma3.png) is flat over layers 0-8 at the last subject token and peaks at 5;
    # MEMIT's context templates, as its tokenizer has no <|endoftext|> to sample ROME's from.
    "gemma3-270m": RomeHParams(layer=5, context_templates="memit"),
}
# (family, layers, width) -> preset
_BY_SHAPE = {("gpt2", 24, 1024): "gpt2-medium", ("gpt2", 36, 1280): "gpt2-large",
             ("gpt2", 48, 1600): "gpt2-xl", ("gptj", 28, 4096): "gpt-j-6b",
             ("gpt2", 6, 256): "gpt2-cf-tiny", ("llama", 30, 576): "smollm2-135m",
             ("gemma3_text", 18, 640): "gemma3-270m"}


def preset_for(config: ModelConfig, name: str | None = None) -> RomeHParams:
    """The preset named ``name``, or the one for a model of this family, depth and width."""
    if name is None:
        name = _BY_SHAPE.get((config.model_type, config.n_layer, config.d_model))
        if name is None:
            raise ValueError(f"layer: no preset for a {config.n_layer}-layer "
                             f"{config.model_type}; pass a layer")
    if name not in PRESETS:
        raise ValueError(f"hparams: unknown preset {name!r} ({', '.join(PRESETS)})")
    return PRESETS[name].check(config)

"""Hyper-parameters of the batch editors (MEMIT, EMMET, AlphaEdit), with presets.

The v* targets use ``RomeHParams`` at the window's last layer (MEMIT's ``compute_z``); the rest
are the closed forms' own settings. Presets follow the originals' JSON files where they exist
(kmeng01/memit ``hparams/MEMIT``, jianghoucheng/AlphaEdit ``hparams/AlphaEdit``,
scalable-model-editing/unified-model-editing ``hparams/EMMET``). For models the originals never
edited, the window is chosen by one rule from the causal trace: the five layers that end at the
layer where the MLP's indirect effect at the last subject token peaks (ROME's layer; GPT-2 XL's
MEMIT window 13-17 ends at ROME's 17), cut at layer 0.
"""

from __future__ import annotations

import dataclasses
import numbers

from rome_jax.models.config import ModelConfig
from rome_jax.rome.hparams import PRESETS, RomeHParams, check_numbers, preset_for

BATCH_METHODS = ("memit", "emmet", "alphaedit")
KEY_CONVENTIONS = ("rome", "c-rome", "p-rome")
WINDOW = 5  # layers in the rule's window


@dataclasses.dataclass(frozen=True)
class BatchHParams:
    """``layers``: the edited layers, ascending (MEMIT's ``layers``; the v* targets z are
    optimised at the last one, with ``v``, whose ``layer`` must be it). ``mom2_update_weight``:
    MEMIT's λ in (λC + KᵀK); EMMET's C' = mom2_update_weight·C + update_norm_lambda·I, as its
    original. ``emmet_lambda``: EMMET's λ_E (its ridge on the batch's B×B
    system). ``nullspace_threshold``: AlphaEdit's eigenvalue threshold for the null space of C
    (absolute, as the original's 2e-2, or a fraction of C's largest eigenvalue when
    ``nullspace_relative``). ``l2``: AlphaEdit's ridge ``L2``. ``keys``: the key convention
    (``"rome"``: keys k̄ with the residual measured at the plain prompt, as MEMIT and the
    original ROME code do; ``"c-rome"``: k̄ with the residual measured at k̄; ``"p-rome"``:
    the plain prompt's key k^u)."""

    layers: tuple[int, ...]
    v: RomeHParams
    mom2_update_weight: float = 15000.0
    update_norm_lambda: float = 0.0
    emmet_lambda: float = 0.1
    nullspace_threshold: float = 2e-2
    nullspace_relative: bool = False
    l2: float = 10.0
    keys: str = "rome"

    def __post_init__(self):
        layers = self.layers
        if (not isinstance(layers, (tuple, list)) or not layers
                or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool)
                           and x >= 0 for x in layers)
                or list(layers) != sorted(set(layers))):
            raise ValueError(f"layers: must be distinct layer numbers >= 0 in ascending order, "
                             f"got {layers!r}")
        object.__setattr__(self, "layers", tuple(int(x) for x in layers))
        if not isinstance(self.v, RomeHParams):
            raise TypeError(f"v: expected RomeHParams, got {type(self.v).__name__}")
        if self.v.layer != self.layers[-1]:
            raise ValueError(f"v: its layer ({self.v.layer}) must be the last edited layer "
                             f"({self.layers[-1]})")
        check_numbers(self, (("mom2_update_weight", True), ("update_norm_lambda", False),
                             ("emmet_lambda", False), ("nullspace_threshold", True),
                             ("l2", False)))
        if self.keys not in KEY_CONVENTIONS:
            raise ValueError(f"keys: {self.keys!r} is not one of {', '.join(KEY_CONVENTIONS)}")

    def check(self, config: ModelConfig) -> "BatchHParams":
        for layer in self.layers:
            config.check_layer(layer)
        if config.sandwich_norm and len(self.layers) > 1:
            # The residual R = δ − (h_z − h_z⁰) mixes the MLP output's space (δ) with the
            # residual stream's, which Gemma's norm after the MLP separates: only one layer,
            # where h_z − h_z⁰ = 0, is exact.
            raise ValueError(f"layers: {list(self.layers)}: a {config.model_type} model norms "
                             "the MLP output before the residual stream, so a batch edit "
                             "spread over several layers is not exact; give one layer")
        self.v.check(config)
        return self

    def replace(self, **changes) -> "BatchHParams":
        return dataclasses.replace(self, **changes)

    def with_layers(self, layers) -> "BatchHParams":
        """The same settings over other ``layers`` (v* at the new last layer)."""
        layers = tuple(layers)
        return dataclasses.replace(self, layers=layers, v=self.v.replace(layer=layers[-1]))


def _memit_v(layer: int, **changes) -> RomeHParams:
    """MEMIT's compute_z settings: clamp 0.75 of the residual stream's norm, MEMIT's
    templates (the plain prompt and 5 generated prefixes of 10 tokens from its opening words);
    the rest as ROME's (v_lr 0.5, 20 steps, decay 0.5, KL 0.0625) unless changed."""
    return RomeHParams(layer=layer, clamp_norm_factor=0.75, clamp_reference="residual",
                       context_templates="memit", context_template_length_params=((10, 5),),
                       **changes)


def _window(top: int) -> tuple[int, ...]:
    return tuple(range(max(0, top - WINDOW + 1), top + 1))


# The originals' presets (kmeng01/memit hparams/MEMIT, jianghoucheng/AlphaEdit
# hparams/AlphaEdit, unified-model-editing hparams/EMMET): (layers, BatchHParams fields,
# RomeHParams fields of z). AlphaEdit's files carry mom2_update_weight but never use it.
_ORIGINALS = {
    ("memit", "gpt2-xl"): (tuple(range(13, 18)), {"mom2_update_weight": 20000.0}, {}),
    ("memit", "gpt-j-6b"): (tuple(range(3, 9)), {"mom2_update_weight": 15000.0},
                            {"v_num_grad_steps": 25}),
    ("emmet", "gpt2-xl"): ((17,), {"mom2_update_weight": 1000.0, "emmet_lambda": 0.1}, {}),
    ("emmet", "gpt-j-6b"): ((5,), {"mom2_update_weight": 1.0, "emmet_lambda": 0.1},
                            {"v_num_grad_steps": 25}),
    ("alphaedit", "gpt2-xl"): (tuple(range(13, 18)), {"l2": 10.0, "nullspace_threshold": 2e-2},
                               {}),
    ("alphaedit", "gpt-j-6b"): (tuple(range(3, 9)), {"l2": 10.0, "nullspace_threshold": 2e-2},
                                {"v_num_grad_steps": 25}),
}


def rule_preset(config: ModelConfig, method: str, top: int) -> BatchHParams:
    """``method``'s settings by the rule (module docstring) for a window ending at layer
    ``top``: MEMIT's and AlphaEdit's five layers (``top`` alone on a model that norms the MLP
    output, ``BatchHParams.check``), EMMET's ``top`` alone, GPT-J's other settings. MEMIT's λ is then GPT-J's per key dimension, 15000 · F / 16384 (λC weighs
    against KᵀK along each key direction roughly as λ · tr(C) / F does; measured on the
    default model, 20 facts: ES 0.55 at λ 15000, 0.85 at 1500, 0.95 at 150)."""
    if method not in BATCH_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(BATCH_METHODS)}")
    top = config.check_layer(top)
    layers = (top,) if method == "emmet" or config.sandwich_norm else _window(top)
    fields = dict(_ORIGINALS[(method, "gpt-j-6b")][1])
    if method == "memit":
        fields["mom2_update_weight"] = round(15000.0 * config.d_mlp / 16384)
    return BatchHParams(layers=layers, v=_memit_v(layers[-1]), **fields).check(config)


def batch_preset(config: ModelConfig, method: str, name: str | None = None,
                 layer: int | None = None) -> BatchHParams:
    """The preset of ``method`` for a model of this family, depth and width (or ``name``): the
    original's where it has one, else ``rule_preset`` at ROME's layer; ``layer`` (an edit at
    another layer than the preset's) moves the rule's window there. ValueError for a model
    without a ROME preset."""
    if method not in BATCH_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(BATCH_METHODS)}")
    rome = preset_for(config, name)
    if name is None:
        name = next(n for n, p in PRESETS.items() if p is rome)
    original = _ORIGINALS.get((method, name))
    if original is None or layer not in (None, rome.layer):
        return rule_preset(config, method, rome.layer if layer is None else layer)
    layers, fields, z = original
    return BatchHParams(layers=layers, v=_memit_v(layers[-1], **z), **fields).check(config)


def parse_layers(text: str) -> tuple[int, ...]:
    """"13-17" or "3,4,5" -> ascending distinct layer numbers; ValueError otherwise."""
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-"))
            layers = tuple(range(first, last + 1))
        else:
            layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0 or list(layers) != sorted(set(layers)):
        raise ValueError(f"{text!r}: give a range FIRST-LAST or ascending layers L1,L2,... "
                         "(e.g. 13-17)")
    return layers


def resolve(config: ModelConfig, method: str, layers: tuple[int, ...] | None = None,
            keys: str = "rome", layer: int | None = None, **v_changes) -> BatchHParams:
    """``method``'s preset for the model (``layer``: the rule's window ending there instead;
    a model without a preset: the rule's window ending at ``layers[-1]`` or ``layer``), over
    ``layers`` when given, with the key convention ``keys`` and the v* settings ``v_changes``
    (None values ignored). ValueError naming ``layers``."""
    for one in layers or ():
        try:
            config.check_layer(one)
        except ValueError as err:
            raise ValueError(f"layers: {err}") from None
    try:
        hparams = batch_preset(config, method, layer=layer)
    except ValueError:
        top = layers[-1] if layers else layer
        if top is None:
            raise ValueError("layers: this model has no batch preset; give the layers to edit "
                             "(e.g. 2-4)") from None
        hparams = rule_preset(config, method, top)
    if layers is not None:
        hparams = hparams.with_layers(layers)
    v = hparams.v.replace(**{k: x for k, x in v_changes.items() if x is not None})
    return hparams.replace(v=v, keys=keys).check(config)

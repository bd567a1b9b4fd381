"""rome_jax: pure-functional ROME (Rank-One Model Editing) in JAX, with the collapse fixes."""

from rome_jax.hf import load_model, save_hf
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model, logits

__all__ = ["Model", "ModelConfig", "load_model", "logits", "save_hf"]

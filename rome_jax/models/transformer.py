"""The forward pass of GPT-2, GPT-J, GPT-NeoX and Llama (with Qwen2, Qwen3, Mistral, Phi-3 and
Gemma 2 / 3) as pure functions over a params pytree, with ROME's taps. One forward for all families;
``ModelConfig`` fields say where they differ.

Params layout (every block leaf is stacked along a leading layer axis ``[L, ...]``; dense
weights are stored ``[in, out]`` and applied as ``x @ w + b``; a ``b`` is absent where the
layer has no bias):

    wte [V, D]           token embedding
    wpe [P, D]           learned positions (GPT-2 only)
    blocks/ln_1, ln_2    LayerNorm {scale, bias} or RMSNorm {scale} [L, D] (no ln_2 in GPT-J)
    blocks/attn/q        {w [L, D, H*hd], b [L, H*hd]} (b with ``attention_bias``)
    blocks/attn/k,v      {w [L, D, KV*hd], b [L, KV*hd]} (KV = H except with grouped queries)
    blocks/attn/o        {w [L, H*hd, D], b [L, D]} (b with ``attention_out_bias``)
    blocks/attn/q_norm   {scale [L, hd]}, and k_norm (Qwen3, Gemma 3: ``qk_norm``)
    blocks/attn_post     {scale [L, D]}, and mlp_post: norms of the branch outputs (Gemma)
    blocks/mlp/gate      {w [L, D, F], b [L, F]} (Llama only: gate_proj)
    blocks/mlp/fc_in     {w [L, D, F], b [L, F]} (Llama: up_proj, b with mlp_bias)
    blocks/mlp/fc_out    {w [L, F, D], b [L, D]}  ROME's W (as W^T) and b (see ``rome_weight``)
    ln_f                 {scale, bias} or {scale} [D]
    lm_head              {w [D, V], b [V]} (untied heads only; b: GPT-J only)

Training adds dropout (``Dropout``) on the embedding sum and on the output of each residual
branch, as GPT-2 does (GPT-2 also drops attention probabilities; left out, as it costs a tenth of
a CPU training step). Inference never drops anything.

The taps ROME needs (see ``forward``): the MLP key (input of ``fc_out``) at one layer and one
position per row, a delta added to the MLP output there, a cached residual stream at that layer
so lower blocks are skipped, and logits at chosen positions only.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rome_jax.models.config import ModelConfig

Params = dict[str, Any]


class Context(NamedTuple):
    """Per-batch facts every block needs. positions [B, T] int (the queries'); attn_bias
    [B, 1, T, S]; key_positions [B, S] int, the keys' positions for a sliding window (``None``:
    the keys are the queries, S = T)."""

    positions: jax.Array
    attn_bias: jax.Array
    key_positions: jax.Array | None = None


class ForwardOut(NamedTuple):
    """logits [B, T or P, V]; key [B, F] at (layer, token_index) or None."""

    logits: jax.Array
    key: jax.Array | None


class Dropout(NamedTuple):
    """Training-time dropout: a PRNG ``key`` and the ``rate`` (static) used at every site."""

    key: jax.Array
    rate: float


def drop(x: jax.Array, key: jax.Array | None, rate: float) -> jax.Array:
    """Inverted dropout: zero each entry with probability p = round(256 rate) / 256 (one random
    byte per entry, a quarter of the random bits of a float draw), scale the rest by 1 / (1 - p);
    ``key=None`` returns x unchanged."""
    cut = round(rate * 256)
    if key is None or cut == 0:
        return x
    keep = jax.random.bits(key, x.shape, jnp.uint8) >= cut
    return jnp.where(keep, x / (1.0 - cut / 256), jnp.zeros((), x.dtype))


def make_context(input_shape: tuple[int, int], attention_mask: jax.Array | None,
                 dtype=jnp.float32) -> Context:
    """Causal + padding mask and position ids (``cumsum(mask) - 1``) for a [B, T] batch.

    Position ids count only real tokens, so a left-padded row computes exactly what the same row
    unpadded computes.
    """
    batch, seq = input_shape
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), jnp.int32)
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    allowed = causal[None, None] & (mask[:, None, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)
    return Context(positions, bias)


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def rms_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """Llama's RMSNorm: x / sqrt(mean(x²) + eps) in float32, cast back, times ``scale``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return p["scale"] * normed.astype(x.dtype)


def gemma_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMSNorm: x / sqrt(mean(x²) + eps) * (1 + ``scale``), all in float32, cast back."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (normed * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)


def norm(p: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The family's normalisation (``cfg.norm``) of x [..., D]."""
    if cfg.norm == "rms":
        return rms_norm(p, x, cfg.layer_norm_epsilon)
    if cfg.norm == "gemma":
        return gemma_norm(p, x, cfg.layer_norm_epsilon)
    return layer_norm(p, x, cfg.layer_norm_epsilon)


def widened(x: jax.Array) -> jax.Array:
    """``x`` in float32, or in its own dtype when that is wider (float64): the precision of
    everything an edit computes from the forward's outputs (keys, v*, closed forms, the update,
    log-probabilities) whatever the weights' dtype (bfloat16 / float16)."""
    return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


def rome_weight(params: Params, layer: int) -> tuple[jax.Array, jax.Array]:
    """ROME's W (as W^T, [F, D]) and b ([D]; zeros when the projection has no bias) at
    ``layer``: the MLP output projection whose input is the key."""
    fc_out = params["blocks"]["mlp"]["fc_out"]
    w = fc_out["w"][layer]
    return w, fc_out["b"][layer] if "b" in fc_out else jnp.zeros(w.shape[-1], w.dtype)


def key_weights(params: Params, layer: int) -> tuple[Params, Params]:
    """Every weight that produces the keys at ``layer``: (the embeddings, the blocks up to
    ``layer`` [layer + 1, ...] without block ``layer``'s MLP output projection, which an edit
    changes)."""
    embeddings = {k: v for k, v in params.items() if k not in ("blocks", "ln_f", "lm_head")}
    blocks = jax.tree.map(lambda w: w[:layer + 1], params["blocks"])
    blocks["mlp"] = {**blocks["mlp"],
                     "fc_out": jax.tree.map(lambda w: w[:layer], blocks["mlp"]["fc_out"])}
    return embeddings, blocks


def dense(p: Params, x: jax.Array) -> jax.Array:
    """x @ w (+ b when the layer has a bias)."""
    y = x @ p["w"]
    return y + p["b"] if "b" in p else y


def activation(name: str, x: jax.Array) -> jax.Array:
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


def rotary(x: jax.Array, positions: jax.Array, cfg: ModelConfig, theta=None) -> jax.Array:
    """Rotary embedding on the first ``cfg.rotary_dim`` dims of x [B, T, heads, hd].

    Pair i turns by angle ``position / theta^(2i / rotary_dim)`` (``theta``: a scalar, maybe
    traced; ``None``: ``cfg.rope_theta``); the pair is dims
    (2i, 2i+1) in the ``"interleaved"`` layout (GPT-J) and (i, i + rotary_dim/2) in the
    ``"half"`` layout (Llama's ``rotate_half``).
    """
    rotary_dim = cfg.rotary_dim
    exponents = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv_freq = 1.0 / ((cfg.rope_theta if theta is None else theta) ** exponents)
    angle = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, rd/2]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if cfg.rotary_layout == "half":
        angle = jnp.concatenate([angle, angle], axis=-1)
        first, second = rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:]
        swapped = jnp.concatenate([-second, first], axis=-1)
    else:
        angle = jnp.repeat(angle, 2, axis=-1)
        swapped = jnp.stack([-rot[..., 1::2], rot[..., ::2]], axis=-1).reshape(rot.shape)
    sin = jnp.sin(angle)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angle)[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([rot * cos + swapped * sin, rest], axis=-1)


def attention(p: Params, cfg: ModelConfig, x: jax.Array, ctx: Context,
              past: tuple[jax.Array, jax.Array] | None = None, layer=None):
    """Causal self-attention with grouped queries. x [B, T, D] -> (out [B, T, D],
    (k, v) [B, T, KV, hd]).

    Query head h reads key/value head ``h // G`` (G = H / KV; G = 1 is plain multi-head
    attention). ``past`` = (k, v) [B, Tp, KV, hd] of earlier positions (rotary already applied)
    is attended before this call's own keys; ``ctx.attn_bias`` is then [B, 1, T, Tp + T]. With
    ``cfg.qk_norm`` each head of q and k is RMS-normed before the rotary embedding; with
    ``cfg.sliding_window`` W a query at position i sees no key at a position j <= i - W.
    With ``cfg.layer_types``, block ``layer`` (an int, maybe traced) picks its window (sliding
    layers only) and rotary base (``rope_local_theta`` in sliding layers). Scores are
    q·k / sqrt(``query_scale`` or hd), soft-capped to ``c tanh(s / c)`` with ``attn_softcap``.
    """
    sliding, theta = cfg.sliding_window is not None, None
    if cfg.layer_types is not None:
        if layer is None:
            raise ValueError("layer: a model with per-layer attention types needs the index")
        sliding = jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])[layer]
        if cfg.rope_local_theta is not None:
            theta = jnp.where(sliding, cfg.rope_local_theta, cfg.rope_theta)
    batch, seq, _ = x.shape
    n_kv, hd = cfg.n_kv_head, cfg.head_dim
    q = dense(p["q"], x).reshape(batch, seq, cfg.n_head, hd)
    k, v = (dense(p[name], x).reshape(batch, seq, n_kv, hd) for name in ("k", "v"))
    if cfg.qk_norm:
        q, k = norm(p["q_norm"], cfg, q), norm(p["k_norm"], cfg, k)
    if cfg.rotary_dim is not None:
        q = rotary(q, ctx.positions, cfg, theta)
        k = rotary(k, ctx.positions, cfg, theta)
    k_all, v_all = (k, v) if past is None else (jnp.concatenate([past[0], k], 1),
                                                jnp.concatenate([past[1], v], 1))
    q = q.reshape(batch, seq, n_kv, cfg.n_head // n_kv, hd)              # [B, T, KV, G, hd]
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k_all) / math.sqrt(cfg.query_scale or hd)
    if cfg.attn_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    bias = ctx.attn_bias
    if cfg.sliding_window is not None:
        keys_at = ctx.positions if ctx.key_positions is None else ctx.key_positions
        far = ctx.positions[:, :, None] - keys_at[:, None, :] >= cfg.sliding_window  # [B, T, S]
        bias = jnp.where(far[:, None] & sliding, jnp.finfo(bias.dtype).min, bias)
    bias = bias[:, :, None].astype(scores.dtype)                          # [B, 1, 1, T, S]
    weights = jax.nn.softmax(scores + bias, axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v_all).reshape(batch, seq, cfg.n_head * hd)
    return dense(p["o"], out), (k, v)


def mlp(p: Params, cfg: ModelConfig, x: jax.Array, delta: jax.Array | None = None):
    """MLP with its key. x [B, T, D] -> (out [B, T, D], key [B, T, F]); ``delta`` [B, T, D] is
    added to the output (ROME's v* = W k + b + delta). The key is ``act(fc_in(x))``, or
    ``act(gate(x)) * fc_in(x)`` for a gated MLP (Llama's SwiGLU)."""
    key = activation(cfg.activation, dense(p["gate" if cfg.gated_mlp else "fc_in"], x))
    if cfg.gated_mlp:
        key = key * dense(p["fc_in"], x)
    out = dense(p["fc_out"], key)
    return (out if delta is None else out + delta), key


class BlockOut(NamedTuple):
    """h [B, T, D] leaving the block; key [B, T, F] (ROME's); kv (k, v) [B, T, KV, hd]; attn and
    mlp [B, T, D]: the two branch outputs added to the residual stream."""

    h: jax.Array
    key: jax.Array
    kv: tuple[jax.Array, jax.Array]
    attn: jax.Array
    mlp: jax.Array


def block(p: Params, cfg: ModelConfig, h: jax.Array, ctx: Context,
          mlp_delta: jax.Array | None = None, past=None, dropout: Dropout | None = None,
          patch: Callable[[str, jax.Array], jax.Array] | None = None, layer=None) -> BlockOut:
    """Transformer block ``layer`` (an int, maybe traced; needed with ``cfg.layer_types``) on
    h [B, T, D].

    Sequential: ``h + a + mlp(ln_2(h + a))`` with ``a = attn(ln_1(h))``; parallel:
    ``h + a + mlp(ln_2(h))`` (GPT-NeoX), ``h + a + mlp(ln_1(h))`` (GPT-J, no ln_2); with
    ``cfg.sandwich_norm`` (Gemma) a is ``attn_post(attn(ln_1(h)))`` and the MLP branch
    ``mlp_post(mlp(...))``. ``mlp_delta`` [B, T, D] is added to the MLP output (before
    ``mlp_post``: δ goes into the down-projection's output); ``past`` as in ``attention``;
    ``dropout`` drops both branch outputs; ``patch(name, out)`` (name ``"attn"`` or ``"mlp"``)
    replaces a branch output before it is added (causal tracing restores clean states so).
    """
    attn_drop, mlp_drop = [None] * 2 if dropout is None else jax.random.split(dropout.key)
    rate = 0.0 if dropout is None else dropout.rate
    x = norm(p["ln_1"], cfg, h)
    attn_out, kv = attention(p["attn"], cfg, x, ctx, past, layer)
    if cfg.sandwich_norm:
        attn_out = norm(p["attn_post"], cfg, attn_out)
    attn_out = drop(attn_out, attn_drop, rate)
    if patch is not None:
        attn_out = patch("attn", attn_out)
    base = h + attn_out
    if not cfg.parallel_residual:
        x = norm(p["ln_2"], cfg, base)
    elif "ln_2" in p:
        x = norm(p["ln_2"], cfg, h)
    mlp_out, key = mlp(p["mlp"], cfg, x, mlp_delta)
    if cfg.sandwich_norm:
        mlp_out = norm(p["mlp_post"], cfg, mlp_out)
    mlp_out = drop(mlp_out, mlp_drop, rate)
    if patch is not None:
        mlp_out = patch("mlp", mlp_out)
    return BlockOut(base + mlp_out, key, kv, attn_out, mlp_out)


def run_blocks(params: Params, cfg: ModelConfig, h: jax.Array, ctx: Context,
               start: int, stop: int, dropout: Dropout | None = None) -> jax.Array:
    """Blocks ``start <= l < stop`` by ``lax.scan`` (one compiled block). h [B, T, D]."""
    if stop <= start:
        return h
    layers = (jax.tree.map(lambda w: w[start:stop], params["blocks"]), jnp.arange(start, stop))
    if dropout is None:
        return jax.lax.scan(lambda h, xs: (block(xs[0], cfg, h, ctx, layer=xs[1]).h, None),
                            h, layers)[0]

    def step(h, xs):
        (p, layer), key = xs
        return block(p, cfg, h, ctx, dropout=Dropout(key, dropout.rate), layer=layer).h, None

    return jax.lax.scan(step, h, (layers, jax.random.split(dropout.key, stop - start)))[0]


def token_embeddings(params: Params, cfg: ModelConfig, input_ids: jax.Array) -> jax.Array:
    """The tokens' ``wte`` rows, times sqrt(D) with ``cfg.embed_scale`` (Gemma).
    input_ids [...] -> [..., D]."""
    h = params["wte"][input_ids]
    if cfg.embed_scale:
        h = h * jnp.asarray(math.sqrt(cfg.d_model), h.dtype)
    return h


def embed(params: Params, cfg: ModelConfig, input_ids: jax.Array, ctx: Context) -> jax.Array:
    """Token embeddings (:func:`token_embeddings`) + learned position embeddings.
    input_ids [B, T] -> h [B, T, D]."""
    h = token_embeddings(params, cfg, input_ids)
    if "wpe" in params:
        h = h + params["wpe"][ctx.positions]
    return h


def unembed(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """Final norm and LM head (soft-capped to ``c tanh(z / c)`` with ``cfg.final_softcap``).
    h [..., D] -> logits [..., V]."""
    x = norm(params["ln_f"], cfg, h)
    logits = x @ params["wte"].T if cfg.tied_lm_head else dense(params["lm_head"], x)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def residual_at(params: Params, cfg: ModelConfig, input_ids: jax.Array,
                attention_mask: jax.Array | None, layer: int) -> jax.Array:
    """The residual stream entering block ``layer``: [B, T, D]. Cache it; an edit at ``layer``
    cannot change it."""
    ctx = make_context(input_ids.shape, attention_mask, params["wte"].dtype)
    return run_blocks(params, cfg, embed(params, cfg, input_ids, ctx), ctx, 0, layer)


def residual_after(params: Params, cfg: ModelConfig, h: jax.Array,
                   attention_mask: jax.Array | None, start: int, stop: int,
                   token_index: jax.Array) -> jax.Array:
    """The residual stream leaving block ``stop - 1`` at ``token_index`` [B]: [B, D], from h
    [B, T, D] entering block ``start`` (``residual_at``). MEMIT's z is this at its last layer."""
    ctx = make_context(h.shape[:2], attention_mask, h.dtype)
    h = run_blocks(params, cfg, h, ctx, start, stop)
    return jnp.take_along_axis(h, token_index[:, None, None], axis=1)[:, 0]


def forward(params: Params, cfg: ModelConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, *, layer: int | None = None,
            token_index: jax.Array | None = None, mlp_delta: jax.Array | None = None,
            residual: jax.Array | None = None,
            logit_positions: jax.Array | None = None,
            dropout: Dropout | None = None) -> ForwardOut:
    """Run the model with ROME's taps.

    Args:
      input_ids: [B, T] token ids (padding anywhere the mask is 0).
      attention_mask: [B, T], 1 for real tokens; ``None`` means all real.
      layer: static block index for the taps below.
      token_index: [B] position per row at which the key is read and ``mlp_delta`` is added.
      mlp_delta: [D] or [B, D], added to the MLP output of ``layer`` at ``token_index``.
      residual: [B, T, D] cached input of block ``layer`` (``residual_at``); blocks below it are
        skipped.
      logit_positions: [B, P] positions whose logits are wanted; ``None`` means all.
      dropout: training-time ``Dropout`` (full forward only, not with the taps above).

    Returns:
      ForwardOut(logits [B, T or P, V], key [B, F] at (layer, token_index) or None).
    """
    ctx = make_context(input_ids.shape, attention_mask, params["wte"].dtype)
    key = None
    if layer is None:
        if residual is not None or token_index is not None or mlp_delta is not None:
            raise ValueError("layer: residual, token_index and mlp_delta need a layer")
        h = embed(params, cfg, input_ids, ctx)
        if dropout is not None:
            embed_key, blocks_key = jax.random.split(dropout.key)
            h = drop(h, embed_key, dropout.rate)
            dropout = Dropout(blocks_key, dropout.rate)
        h = run_blocks(params, cfg, h, ctx, 0, cfg.n_layer, dropout)
    elif dropout is not None:
        raise ValueError("dropout is for training and cannot be combined with ROME's taps")
    else:
        cfg.check_layer(layer)
        h = residual
        if h is None:
            h = run_blocks(params, cfg, embed(params, cfg, input_ids, ctx), ctx, 0, layer)
        delta_full = None
        onehot = None
        if token_index is not None:
            onehot = jax.nn.one_hot(token_index, input_ids.shape[1], dtype=h.dtype)  # [B, T]
            if mlp_delta is not None:
                delta_full = onehot[:, :, None] * jnp.broadcast_to(
                    mlp_delta, (h.shape[0], h.shape[-1]))[:, None, :]
        p_layer = jax.tree.map(lambda w: w[layer], params["blocks"])
        h, keys = block(p_layer, cfg, h, ctx, delta_full, layer=layer)[:2]
        if onehot is not None:
            key = jnp.einsum("bt,btf->bf", onehot, keys)
        h = run_blocks(params, cfg, h, ctx, layer + 1, cfg.n_layer)
    if logit_positions is not None:
        h = jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
    return ForwardOut(unembed(params, cfg, h), key)


def mlp_key(params: Params, cfg: ModelConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None, layer: int,
            token_index: jax.Array | None = None) -> jax.Array:
    """ROME's key: the input of block ``layer``'s MLP output projection.

    Returns [B, F] at ``token_index`` [B], or [B, T, F] at every position when it is None.
    Blocks above ``layer`` are not run.
    """
    cfg.check_layer(layer)
    ctx = make_context(input_ids.shape, attention_mask, params["wte"].dtype)
    h = run_blocks(params, cfg, embed(params, cfg, input_ids, ctx), ctx, 0, layer)
    keys = block(jax.tree.map(lambda w: w[layer], params["blocks"]), cfg, h, ctx,
                 layer=layer).key
    if token_index is None:
        return keys
    return jnp.take_along_axis(keys, token_index[:, None, None], axis=1)[:, 0]


def blocks_kv(params: Params, cfg: ModelConfig, h: jax.Array, ctx: Context, start: int):
    """Blocks ``start..L-1`` on h [B, T, D], keeping every layer's attention keys and values.

    Returns (h [B, T, D], k [L - start, B, T, KV, hd], v [L - start, B, T, KV, hd]).
    """
    layers = jax.tree.map(lambda w: w[start:], params["blocks"])

    def step(h, xs):
        out = block(xs[0], cfg, h, ctx, layer=xs[1])
        return out.h, out.kv

    h, (k, v) = jax.lax.scan(step, h, (layers, jnp.arange(start, cfg.n_layer)))
    return h, k, v


def forward_live(params: Params, cfg: ModelConfig, layer: int, h: jax.Array, ctx: Context,
                 past_k: jax.Array, past_v: jax.Array, mlp_delta: jax.Array,
                 logit_positions: jax.Array) -> jax.Array:
    """Blocks ``layer..L-1`` on the positions that can still change ("live") only.

    h [B, W, D] is the residual entering ``layer`` at the live positions; past_k, past_v
    [L - layer, B, Tp, KV, hd] the cached attention keys and values of the earlier positions at
    every layer from ``layer`` up (they cannot change: attention is causal); ctx holds the live
    positions [B, W] and a bias [B, 1, W, Tp + W]; mlp_delta [B, W, D] is added to the MLP output
    of ``layer``. Returns logits [B, P, V] at ``logit_positions`` [B, P] (live coordinates).
    """
    first = jax.tree.map(lambda w: w[layer], params["blocks"])
    h = block(first, cfg, h, ctx, mlp_delta, past=(past_k[0], past_v[0]), layer=layer).h
    rest = jax.tree.map(lambda w: w[layer + 1:], params["blocks"])

    def step(h, xs):
        p, k, v, i = xs
        return block(p, cfg, h, ctx, past=(k, v), layer=i).h, None

    h = jax.lax.scan(step, h, (rest, past_k[1:], past_v[1:],
                               jnp.arange(layer + 1, cfg.n_layer)))[0]
    h = jnp.take_along_axis(h, logit_positions[:, :, None], axis=1)
    return unembed(params, cfg, h)

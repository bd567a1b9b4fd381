"""Editors: each method's closed form as one small module, and the value every editor returns.

    delta.py      Edit = {layer: Factors | dense Δw}, applied by one ``apply_edit``
    rome.py       ROME's rank-one update in its three key conventions (rome, c-rome, p-rome)
    memit.py      MEMIT's least-squares update  Δw = (λC + KᵀK)⁻¹ Kᵀ R
    emmet.py      EMMET's batched equality constraints  Δw = U (K_b U + λ_E I)⁻¹ R, U = C⁻¹K_aᵀ
    alphaedit.py  AlphaEdit's null-space projected update
    lowrank.py    what every batch closed form reports about its Δw = left @ right
    batch.py      the batch editors' driver: v* targets, keys per layer, the residual spread
                  over the layers, and the sequential fold over batches
    hparams.py    the batch editors' settings and presets

Orientation as the model: ``out = k @ w + b`` with w [F, D] (ROME's W = wᵀ); a batch of B
requests has keys K [B, F] (rows) and residuals R [B, D]. This package's ``__init__`` imports
nothing, so the single-edit pipeline (``rome.edit``) can use the closed forms while
``batch.py`` uses the pipeline.
"""

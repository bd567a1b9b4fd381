"""The papers' experiments, one module each, run by ``rome-jax experiment NAME``.

===============  =========================================================================
``collapse``     collapse cases vs normal cases: numerator and denominator of the update
                 ("The Fall of ROME" Table 1) and the largest perplexity after ``rome`` and
                 ``c-rome`` (Table 2)
``bos``          the same with a start token before every sequence, beside the run without
                 ("The Fall of ROME" §3.3)
``sequential``   sequential edits per method (the ROME family or a batch editor, one fact per
                 update): ‖Δ‖, ME-PPL_1k and downstream accuracy every k edits, final
                 CounterFact scores beside single edits ("Rebuilding ROME")
``zsre``         ROME's zsRE token accuracies (efficacy, paraphrase, specificity) per method
``geometry``     PCA / t-SNE maps of k^u, k̄, C⁻¹k̄ and first-token keys, forward passes only
                 ("The Fall of ROME" Figures 1-2)
``single``       the collapse run's records edited once with ``rome``, ``r-rome`` and
                 ``p-rome``: CounterFact metrics with and without the test-time prefix, |Δ|
                 against normalised generation entropy ("The Fall of ROME" Tables 3-4,
                 "Rebuilding ROME" Tables 1, 2, 4 and Figure 2)
``batch``        one MEMIT / EMMET / AlphaEdit update of 1, 10, 100, … facts: CounterFact
                 scores, ME-PPL_1k, the v* solves' and the closed forms' wall time
``sequential-batch``  facts in batches, each batch one update of the previous result:
                 ME-PPL_1k, downstream accuracy, efficacy of all facts so far (AlphaEdit)
``batch-collapse``  a collapse run's collapse cases and normal records in one update, per
                 batch editor and key convention: ME-PPL_50 ratio, efficacy, ‖Δw‖
``second2first``  a collapse run's first-token records edited from the model and from its
                 Second2First copy (position 1's learned embedding at position 0): keys'
                 anomaly and ME-PPL_50 ratio of ``rome`` and ``c-rome`` (the slides of "The
                 Fall of ROME")
``guard``        the collapse guard, calibrated without a collapse run's records, scored
                 on its edits: true/false positives at the default thresholds, ROC curves
===============  =========================================================================

An experiment module has ``NAME``, ``HELP``, ``add_args(parser)`` (its own options),
``settings(args) -> dict`` (what its rows depend on besides the model setup; pinned in the
journal), ``run(setup, args, journal, header)`` (computes the rows that the journal does not
hold yet, appending each as soon as it is done; ``header`` is ``{"experiment", "settings",
"out"}``) and ``report(header, rows) -> Report`` (summary, Markdown tables and figure, from the
rows alone). ``setup`` is the CLI's ``Setup``: model, hparams, context templates and the
ME-PPL_50 probe, built lazily.
"""

from __future__ import annotations

from rome_jax.experiments import (batch, batch_collapse, bos, collapse, geometry, guard,
                                  second2first, sequential, sequential_batch, single, zsre)

EXPERIMENTS = {m.NAME: m for m in (collapse, bos, single, sequential, zsre, geometry,
                                   second2first, batch, sequential_batch, batch_collapse,
                                   guard)}

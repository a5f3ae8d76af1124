"""The gate: a probe on the base model's own hidden state that decides, per prompt, whether a
patch applies (docs/gate.md). One module per concern, in the order data flows:

* :mod:`.probe`: the probe as a value (``Gate``, ``gate.safetensors``), reading hidden states
  (``layer_states``), the logistic fit (``fit_probe``); what a gated patch carries.
* :mod:`.phrasings`: the re-askings and frames the pool adds to its requests.
* :mod:`.config`: ``GateFitConfig`` (the ``gate`` group of a training config, ``gate fit``'s
  flags) and the layers it resolves to on a model.
* :mod:`.pool`: which prompts the gate learns from (a data folder's train split, re-asked and
  reframed, the hand-written sources) and which held-out prompts measure it.
* :mod:`.features`: token ids to last-prompt-token states, batched, cached on disk.
* :mod:`.metrics`: AUROC, TPR at an FPR, FPR at a threshold, each with n and a 95% interval.
* :mod:`.fit`: the fit on a data folder and its threshold (target FPR, out-of-family raise).
* :mod:`.crossfit`: refits that hold something out (a source, template families, look-alike folds).
* :mod:`.folder`: the gate folder (``gate fit --out``), its one reader, ``gate apply``.
* :mod:`.evaluate`: ``gate eval``'s report and its table.

Each module imports only modules above it in this list, so there is no import cycle.
"""

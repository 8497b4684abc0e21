"""SOLO pretraining on megatron-core, by composition (megatron-core itself is never forked).

* ``compat``      CPU redirects for the pinned megatron-core (inert on GPU) — the only shim.
* ``model``       layer specs (TE / local with packed per-document attention) and SoloGPTModel.
* ``data``        packed multimodal ``megatron.core.datasets`` dataset, blends, THD collation.
* ``config``      typed recipe schema (YAML + dotted overrides); recipes in ``recipes/``.
* ``train``       the training loop: ``torchrun ... -m megatron_patch.train --config RECIPE``.
"""

"""Edit2Perceive engine: the algorithm of the official code, written once and shared by the ComfyUI nodes, the
command line (``python -m e2p_core``), training and evaluation.

Entry points: ``pipeline.perceive`` (the algorithm), ``weights.load_dit`` / ``load_vae`` (any checkpoint format),
``backends.diffusers_backend.load_diffusers_backend`` (diffusers models), ``conventions`` (output conventions);
FE2E: ``fe2e.perceive_fe2e``, ``weights.load_step1x``, ``backends.step1x_backend.load_step1x_backend``.
Importing this package imports neither diffusers nor transformers.
"""

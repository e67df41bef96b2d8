"""Who runs the DiT and the VAE. The algorithm (``e2p_core.pipeline``) only sees the two small protocols in
``base``; ``diffusers_backend`` implements them with diffusers models, the ComfyUI nodes with ComfyUI's own models.
"""

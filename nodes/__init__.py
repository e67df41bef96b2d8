"""ComfyUI nodes of the Edit2Perceive pack: thin adapters from ComfyUI types to ``e2p_core``."""

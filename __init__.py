"""ComfyUI entry point of the Edit2Perceive node pack.

ComfyUI imports this file as a package. Nodes are added by the ``nodes`` package; until then the pack registers
none. Nothing here may import diffusers or transformers.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

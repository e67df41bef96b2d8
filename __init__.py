"""ComfyUI entry point of the Edit2Perceive node pack.

ComfyUI imports this file as a package (``custom_nodes/<folder>/__init__.py``); the nodes live in ``nodes/`` and use
relative imports, so the pack works under any folder name. Nothing here imports diffusers or transformers.

Outside a ComfyUI process (pytest importing the repository root as a package, packaging tools) the ComfyUI modules
do not exist and there is nothing to register with: the pack then registers no nodes instead of failing to import.
"""

import importlib.util

if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# The browser side of the pack (the point picker on 'Edit2Perceive Point Prompt'): plain ES modules ComfyUI serves
# under /extensions/<folder>/ and loads with its frontend; no build step.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

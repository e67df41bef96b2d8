"""The ComfyUI nodes of the Edit2Perceive pack (registered by the repository's ``__init__.py``).

Loader -> task conditioning (+ point prompt) -> perceive -> depth / normal / matte output; or one all-in-one node
per task. FE2E: its loader -> its conditioning -> one perceive giving depth and normals -> the same output nodes.
Every node is a thin schema over ``e2p_core`` and the ComfyUI backends (``comfy_backend``, ``comfy_fe2e``).
"""

from .all_in_one import E2PDepthAllInOne, E2PMattingAllInOne, E2PNormalAllInOne
from .conditioning import E2PTaskConditioning, register_prompts_folder
from .encode import E2PEncodeImage
from .fe2e import FE2EConditioning, FE2EModelLoader, FE2EPerceive
from .loader import E2PModelLoader, E2PVAELoader
from .outputs import E2PDepthOutput, E2PMatteOutput, E2PNormalOutput
from .perceive import E2PPerceive
from .point_picker import register_routes
from .point_prompt import E2PPointPrompt

register_prompts_folder()
register_routes()  # the point picker's server side (web/point_picker.js)

_NODES = {
    "E2PModelLoader": (E2PModelLoader, "Edit2Perceive Model Loader"),
    "E2PVAELoader": (E2PVAELoader, "Edit2Perceive VAE Loader"),
    "E2PTaskConditioning": (E2PTaskConditioning, "Edit2Perceive Task Conditioning"),
    "E2PPointPrompt": (E2PPointPrompt, "Edit2Perceive Point Prompt"),
    "E2PEncodeImage": (E2PEncodeImage, "Edit2Perceive Encode Image"),
    "E2PPerceive": (E2PPerceive, "Edit2Perceive Perceive"),
    "E2PDepthOutput": (E2PDepthOutput, "Edit2Perceive Depth Output"),
    "E2PNormalOutput": (E2PNormalOutput, "Edit2Perceive Normal Output"),
    "E2PMatteOutput": (E2PMatteOutput, "Edit2Perceive Matte Output"),
    "E2PDepthAllInOne": (E2PDepthAllInOne, "Edit2Perceive Depth (All-in-One)"),
    "E2PNormalAllInOne": (E2PNormalAllInOne, "Edit2Perceive Normals (All-in-One)"),
    "E2PMattingAllInOne": (E2PMattingAllInOne, "Edit2Perceive Matting (All-in-One)"),
    "E2PFE2EModelLoader": (FE2EModelLoader, "FE2E Model Loader"),
    "E2PFE2EConditioning": (FE2EConditioning, "FE2E Conditioning"),
    "E2PFE2EPerceive": (FE2EPerceive, "FE2E Perceive (depth + normals)"),
}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in _NODES.items()}

"""The three Edit2Perceive tasks and the prompts they were trained with.

The prompts are the training captions of the official scripts (E2P-SPEC §1.1). ``inference.py`` of the reference
uses a different matting prompt; it is kept as an option because some released matting results were made with it.
"""

from dataclasses import dataclass
from typing import Literal

from .errors import InputError

TaskName = Literal["depth", "normal", "matting"]


@dataclass(frozen=True)
class Task:
    name: TaskName
    prompt: str
    output_channels: int  # 1 for depth and alpha (channel mean), 3 for unit normals
    uses_point_map: bool  # matting takes a second Kontext image: the point map


TASKS: dict[str, Task] = {
    "depth": Task("depth", "Transform to depth map while maintaining original composition", 1, False),
    "normal": Task("normal", "Transform to normal map while maintaining original composition", 3, False),
    "matting": Task("matting", "Transform to matting map while maintaining original composition", 1, True),
}

# The prompt of the reference ``inference.py`` matting path (used there with 10 steps); not the training caption.
MATTING_PROMPT_INFERENCE_PY = "Extract the foreground object and generate alpha matte"


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None

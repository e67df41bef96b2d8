"""Errors the engine raises for bad input.

Every message names the offending file, key or value and says what was expected, so a ComfyUI user or a CLI user
can fix the problem without reading the code. All derive from ``ValueError`` so generic callers still catch them.
"""


class E2PError(ValueError):
    """Base class of every user-facing Edit2Perceive error."""


class CheckpointError(E2PError):
    """A weights file is missing, unreadable, unsafe (pickle), of an unknown layout, or for another model."""


class InputError(E2PError):
    """An image, point prompt, mask, noise tensor or option is malformed or out of range."""


class HubError(E2PError):
    """A model file is not on disk and cannot be downloaded: offline, gated, not found, no disk space, or damaged."""


def shortened(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, to quote a user's bad value in a message without flooding it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

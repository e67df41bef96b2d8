"""Command line of ``python -m train``: settings from a config file and flags, errors as one readable line."""

import logging
import sys

from e2p_core.errors import E2PError

from .config import parse_config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(argv)
        from .trainer import train  # heavy imports (diffusers, peft, accelerate) only once the flags are fine

        result = train(config)
    except E2PError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.export_path is not None:
        print(f"trained {result.step} steps; weights: {result.export_path}")
    return 0

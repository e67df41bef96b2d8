"""Which (input image, target) file pairs a dataset has: from a list file, or by scanning its folder.

List files are the reference's (E2P-SPEC §5): one sample per line, columns separated by a TAB when the line has one
(COCO-Matting class names contain spaces) and by whitespace otherwise; column 1 is the RGB input, column 2 the target,
both relative to the dataset root (absolute paths are kept). Matting validation lists have three columns
``image trimap alpha``: the alpha (last column) is the target. Blank lines and lines starting with ``#`` are skipped.
Existence is not checked here for list files (a missing file is a skipped sample at load time, see ``dataset``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from e2p_core.errors import InputError

logger = logging.getLogger(__name__)

Pair = tuple[Path, Path]  # (input image, target)


def read_list_file(list_file: Path, root: Path, allow_trimap_column: bool = False) -> list[Pair]:
    """Parse a list file into (image, target) paths joined to ``root``."""
    if not list_file.is_file():
        raise InputError(f"list file {list_file} does not exist")
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        columns = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        columns = [c for c in columns if c]
        if len(columns) == 3 and allow_trimap_column:
            columns = [columns[0], columns[2]]  # image trimap alpha
        if len(columns) != 2:
            expected = "2 columns (image target) or 3 (image trimap alpha)" if allow_trimap_column else "2 columns"
            raise InputError(f"{list_file} line {number} has {len(columns)} column(s): {line!r}; expected {expected}, "
                             f"separated by a TAB or whitespace")
        pairs.append((root / columns[0], root / columns[1]))
    if not pairs:
        raise InputError(f"list file {list_file} lists no sample")
    return pairs


def pair_up(
    anchors: Iterable[Path], candidates: Callable[[Path], list[Path]], where: str, anchor_is_image: bool = True
) -> list[Pair]:
    """Pair each anchor file with the first existing candidate (its target, or its image when ``anchor_is_image`` is
    False); anchors without one are reported and left out."""
    pairs, orphans = [], []
    for anchor in sorted(anchors):
        partner = next((c for c in candidates(anchor) if c.is_file()), None)
        if partner is None:
            orphans.append(anchor)
        else:
            pairs.append((anchor, partner) if anchor_is_image else (partner, anchor))
    if orphans:
        logger.warning("%s: %d file(s) without their pair left out, e.g. %s (looked for %s)", where, len(orphans),
                       orphans[0], ", ".join(str(c) for c in candidates(orphans[0])))
    return pairs

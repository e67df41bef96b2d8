"""The reference ``gen_trimap`` of the matting samples (E2P-SPEC §4.6).

The trimap marks the unknown band the reference matting loss supervises: the alpha (in 0..255) is eroded and dilated
by the same random elliptical kernel; FG = eroded ≥ 254, BG = dilated ≤ 1, the rest 128. The kernel size is drawn from
5..14 and the iteration count from 5..14, the trimap width being the reference's only augmentation. The draws come
from the ``rng`` passed in (the reference uses the global ``random``/``numpy`` states, which ``gen_points`` re-seeds).
OpenCV does the morphology, exactly as the reference (border pixels see only the image).
"""

from __future__ import annotations

import cv2
import numpy as np

TRIMAP_KERNEL_SIZES = range(5, 15)  # random.choice(range(5, 15)) in the reference
TRIMAP_ITERATIONS = (5, 15)  # np.random.randint(5, 15): 5..14
TRIMAP_FG_MIN, TRIMAP_BG_MAX = 254, 1  # on the 0..255 alpha scale
TRIMAP_BG, TRIMAP_UNKNOWN, TRIMAP_FG = 0, 128, 255


def gen_trimap(alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Alpha float [H,W] in [0,1] → uint8 [H,W] trimap with values 0 (BG), 128 (unknown), 255 (FG)."""
    kernel_size = int(rng.choice(TRIMAP_KERNEL_SIZES))
    iterations = int(rng.integers(*TRIMAP_ITERATIONS))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    alpha_255 = np.ascontiguousarray(alpha, dtype=np.float32) * 255
    dilated = cv2.dilate(alpha_255, kernel, iterations=iterations)
    eroded = cv2.erode(alpha_255, kernel, iterations=iterations)
    trimap = np.full(alpha.shape, TRIMAP_UNKNOWN, dtype=np.uint8)
    trimap[eroded >= TRIMAP_FG_MIN] = TRIMAP_FG
    trimap[dilated <= TRIMAP_BG_MAX] = TRIMAP_BG
    return trimap

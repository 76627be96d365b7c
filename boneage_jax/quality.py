"""Whether an image is usable at all before a model reads it: big enough, not a sliver, not blank.

These are the minimum checks, with a named reason each: an image far below the network's input
size, one with an extreme aspect ratio (a strip, not a hand), or one without contrast (blank,
uniform) gets no bone age. ``predict`` refuses such files with the reason.
"""

from __future__ import annotations

import numpy as np

MAX_ASPECT_RATIO = 5.0  # longest over shortest side; hand radiographs are about 1.2-1.6
MIN_CONTRAST = 16  # grey levels between the 1st and 99th percentile of a uint8 image
LARGEST_MIN_SIDE = 64  # px: the shortest side never needs more than this


def min_side(image_size: int) -> int:
    """The shortest side an image needs: half the network's input, at most 64 px."""
    return max(8, min(LARGEST_MIN_SIDE, image_size // 2))


def unusable_reason(image: np.ndarray, image_size: int) -> str | None:
    """Why a uint8 grey image (H, W) cannot be read by a network of input ``image_size``; None if it can."""
    height, width = image.shape[:2]
    shortest, longest = min(height, width), max(height, width)
    needed = min_side(image_size)
    if shortest < needed:
        return (f"too small: {width}x{height} px; the shortest side needs at least {needed} px "
                f"(the network reads {image_size} px)")
    if longest / shortest > MAX_ASPECT_RATIO:
        return f"aspect ratio {longest / shortest:.1f} (a {width}x{height} strip); at most {MAX_ASPECT_RATIO:g}"
    low, high = np.percentile(image, [1, 99])
    if high - low < MIN_CONTRAST:
        return (f"no contrast: 98% of the pixels lie within {high - low:.0f} grey levels (blank or uniform "
                f"image); at least {MIN_CONTRAST} needed")
    return None

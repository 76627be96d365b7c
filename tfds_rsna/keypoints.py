"""Canonical order of the 27 hand keypoints, for the (K, 2) arrays that samples carry.

The names are those of :mod:`tfds_rsna.phantom` (see its docstring for the anatomy): forearm,
carpals, metacarpal heads, proximal phalanx bases, the middle finger's PIP joint and the tips.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["KEYPOINT_NAMES", "KEYPOINT_INDEX", "keypoints_array"]

KEYPOINT_NAMES: tuple[str, ...] = (
    "radius_distal", "ulna_distal",
    "capitate", "hamate", "lunate", "scaphoid", "triquetrum", "trapezium", "trapezoid", "pisiform",
    "mcp1", "mcp2", "mcp3", "mcp4", "mcp5",
    "prox_phalanx_base1", "prox_phalanx_base2", "prox_phalanx_base3", "prox_phalanx_base4", "prox_phalanx_base5",
    "pip3_proximal", "pip3",
    "thumb_tip", "index_tip", "middle_tip", "ring_tip", "little_tip",
)
KEYPOINT_INDEX: dict[str, int] = {name: i for i, name in enumerate(KEYPOINT_NAMES)}


def keypoints_array(mapping: Mapping[str, tuple[float, float]]) -> np.ndarray:
    """``{name: (x, y)}`` -> (27, 2) float32 in :data:`KEYPOINT_NAMES` order, NaN where missing.

    Raises ValueError for a name that is not a keypoint (a typo would otherwise pass as missing).
    """
    unknown = sorted(set(mapping) - set(KEYPOINT_INDEX))
    if unknown:
        raise ValueError(f"unknown keypoint name(s) {unknown}; known: {', '.join(KEYPOINT_NAMES)}")
    out = np.full((len(KEYPOINT_NAMES), 2), np.nan, np.float32)
    for name, point in mapping.items():
        out[KEYPOINT_INDEX[name]] = point
    return out

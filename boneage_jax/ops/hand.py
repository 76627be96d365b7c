"""Hand masks, rotation alignment, ROI crops and marker suppression.

Sample ops (``align`` and ``roi_crop`` move the mask and keypoints with the image)::

    hand_mask(source='dataset'|'classical'|'cache', cache_dir='', apply=True, fill_value=0)
    align(fill_mode='constant', fill_value=0, source='mask'|'keypoints')
    roi_crop(region='hand'|'roi1'|'roi2'|'roi3', margin=1.15, fill_value=0)
    suppress_markers(source='mask'|'classical', fill_value=0, dilate=0.02)

for example ``"hand_mask(source='classical')|align|roi_crop(region='hand')|resize_pad"``.
Keypoints are (27, 2) arrays in :data:`KEYPOINT_NAMES` order (NaN where unknown).

Measured on phantoms (``tfds_rsna.phantom``, 320x256, :func:`~tfds_rsna.phantom.sample_nuisance`
with collimation bands and markers): :func:`classical_mask` has a mean Jaccard index of 0.969
against the phantom masks over 400 images (minimum 0.917; 0.969 / 0.947 over the 12 of the
test). :func:`align` of a phantom rotated by +-10 or +-20 degrees agrees with that of the
unrotated phantom within 1.5 degrees in the neutral pose (mean 0.6) and, with random nuisance
(rotation pushes fingers or forearm out of the frame or into a band), mean 1.0, 90 % within
2.1, max 3.6 degrees. On 599 real RSNA radiographs (``/work/shared/rsna_sample``, about
800x1000) :func:`classical_mask` takes 50-300 ms and fails visibly on about 3: a film with an
unexposed white area joined to the hand, a dark film inside a grey surround, a partial frame.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np

from boneage_jax.ops import Sample, as_2d, register_preprocess, require_uint8
from boneage_jax.ops.geometry import crop_sample, warp_sample
from tfds_rsna.keypoints import KEYPOINT_INDEX, KEYPOINT_NAMES

__all__ = [
    "KEYPOINT_NAMES",
    "ROI_REGIONS",
    "classical_mask",
    "collimation_bands",
    "keep_hand",
    "fill_holes",
    "largest_component",
    "hand_angle",
    "upright_angle",
    "roi_box",
    "hand_mask",
    "align",
    "roi_crop",
    "suppress_markers",
]

ROI_REGIONS = ("hand", "roi1", "roi2", "roi3")

_FOREARM = ("radius_distal", "ulna_distal")
_ROI1_REQUIRED = _FOREARM + tuple(f"prox_phalanx_base{i}" for i in range(1, 6))
_ROI1_INSIDE = ("capitate", "hamate", "lunate", "scaphoid", "triquetrum", "trapezium", "trapezoid", "pisiform",
                "mcp1", "mcp2", "mcp3", "mcp4", "mcp5")
_ROI3_REQUIRED = tuple(name for name in KEYPOINT_NAMES if name not in _FOREARM)
_ROI_PAD = 0.05  # of the box's width / height, on each side
_ROI2_GROWTH = 0.3  # of ROI1's width / height, on the three sides away from the wrist


# ----------------------------------------------------------------------------- mask helpers


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fills background regions that do not touch the image border (4-connected); 0/255 out."""
    binary = (mask > 0).astype(np.uint8)
    count, labels = cv2.connectedComponents(1 - binary, connectivity=4)
    outside = np.zeros(count, bool)
    outside[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = True
    outside[0] = True  # label 0 is the foreground itself
    return np.where(binary.astype(bool) | ~outside[labels], 255, 0).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected foreground component (255), zeros if none."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    if count < 2:
        return np.zeros(mask.shape, np.uint8)
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return np.where(labels == keep, 255, 0).astype(np.uint8)


def keep_hand(mask: np.ndarray, *, min_area_fraction: float = 0.05) -> np.ndarray:
    """Post-processes a predicted mask: keeps the largest connected component if it covers at
    least ``min_area_fraction`` of the image (small spots are dropped), fills its holes; all
    zeros if no component is large enough. 0/255 uint8 out."""
    hand = largest_component(mask)
    if np.count_nonzero(hand) < min_area_fraction * mask.size:
        return np.zeros(mask.shape, np.uint8)
    return fill_holes(hand)


# ----------------------------------------------------------------------------- classical mask


def _ransac_line(x: np.ndarray, y: np.ndarray, width: int, tolerance: float) -> np.ndarray | None:
    """Line through most of the points (x, y) within ``tolerance``, evaluated at 0..width-1."""
    if x.size < 2:
        return None
    rng = np.random.default_rng(0)  # deterministic
    pairs = rng.integers(0, x.size, (200, 2))
    pairs = pairs[x[pairs[:, 0]] != x[pairs[:, 1]]]
    if not len(pairs):
        return None
    x0, x1, y0, y1 = x[pairs[:, 0]], x[pairs[:, 1]], y[pairs[:, 0]], y[pairs[:, 1]]
    slope = (y1 - y0) / (x1 - x0)
    inliers = np.abs(y[None, :] - (y0[:, None] + slope[:, None] * (x[None, :] - x0[:, None]))) <= tolerance
    best = inliers[int(np.argmax(inliers.sum(axis=1)))]
    return np.polyval(np.polyfit(x[best], y[best], 1), np.arange(width, dtype=np.float64))


def _band_line(g: np.ndarray, *, tol: float = 6.0, step_min: float = 12.0, level: float | None = None,
               min_side: float = 0.5) -> np.ndarray | None:
    """Depth (rows, per column) of a collimation band along the top side of ``g``, or None.

    A band is flat: its two outer rows hold one grey level (``level``, by default their median)
    within ``tol`` on at least ``min_side`` of the side. It ends in a straight edge, fitted by
    RANSAC to the first row per column that leaves the band's level (the hand and markers are
    outliers; where the band does not reach, the line runs past the border), where the grey
    level steps by at least ``step_min``. It is at most 35 % of the image deep.
    """
    h, w = g.shape
    outer = g[:2].mean(axis=0)
    level = float(np.median(outer)) if level is None else level
    if np.mean(np.abs(outer - level) <= tol) < min_side:
        return None
    cap = int(0.4 * h)
    off = np.abs(g[:cap] - level) > tol
    depth = np.where(off.any(axis=0), off.argmax(axis=0), cap).astype(np.float64)
    x = np.arange(w, dtype=np.float64)
    present = (depth > 0) & (depth < cap)
    if present.mean() < min_side:
        return None
    line = _ransac_line(x[present], depth[present], w, tolerance=2.5)
    if line is None:
        return None
    consistent = np.abs(depth - np.maximum(line, 0.0)) <= 2.5
    keep = present & consistent
    if keep.mean() < min_side or consistent.mean() < 0.6 or line.max() < 1 or line.max() > 0.35 * h:
        return None
    rows = np.clip(np.round(line[keep]).astype(int) + 3, 0, h - 1)
    if np.median(np.abs(g[rows, x[keep].astype(int)] - level)) < step_min:
        return None
    return line


def collimation_bands(image: np.ndarray, *, pad: int = 3, binary: bool = False) -> np.ndarray:
    """uint8 mask (255) of collimation bands: flat regions along a whole side of a grey image
    that end in a straight edge (see ``_band_line``), grown by ``pad`` pixels past the edge.
    Pass a lightly blurred image (noise within a few grey levels). ``binary``: find strips of
    foreground (nonzero) along a side instead, reaching across at least a quarter of it (bright
    film edges, frames and partial bands after thresholding)."""
    g = np.asarray(as_2d(image), np.float32)
    if binary:
        g = (g > 0).astype(np.float32) * 255.0
        options = dict(tol=127.0, step_min=127.0, level=255.0, min_side=0.25)
    else:
        options = {}
    bands = np.zeros(g.shape, np.uint8)
    for k in range(4):  # rotate each side to the top, find its band, rotate back
        rotated = np.rot90(g, k)
        line = _band_line(rotated, **options)
        if line is None:
            continue
        rows = np.arange(rotated.shape[0])[:, None]
        band = (rows < line[None, :] + pad).astype(np.uint8) * 255
        bands |= np.rot90(band, -k)
    return bands


def _threshold(g: np.ndarray, valid: np.ndarray) -> float:
    """Halfway between the background level (median below Otsu's threshold) and Otsu's
    threshold over the valid pixels. Where fewer than 8 % of them lie above Otsu's threshold,
    it split off outliers (bright marker letters on a faint hand): it is taken again on the
    pixels below (twice at most)."""
    values = g[valid] if valid.any() else g.ravel()
    values = np.clip(values, 0, 255).astype(np.uint8)
    for _ in range(3):
        otsu, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        below = values[values <= otsu]
        if below.size == values.size or np.mean(values > otsu) >= 0.08:
            break
        values = below
    background = float(np.median(below)) if below.size else 0.0
    return 0.5 * (background + otsu)


def _segment(g: np.ndarray, invalid: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Threshold, strips along the sides removed (threshold again without them), opening,
    largest component, holes filled, closing; ``invalid`` pixels are never hand. A flat image
    (1-99 percentiles within 4 grey levels) has no hand."""
    invalid = invalid.copy()
    values = g[~invalid]
    if values.size == 0 or np.subtract(*np.percentile(values, [99, 1])) < 4.0:
        return np.zeros(g.shape, np.uint8)  # flat: nothing to find
    for _ in range(2):
        fg = ((g > _threshold(g, ~invalid)) & ~invalid).astype(np.uint8) * 255
        strips = collimation_bands(fg, binary=True) > 0  # bright film edges, frames, partial bands
        if not strips.any():
            break
        invalid |= strips
        fg[strips] = 0
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(fill_holes(largest_component(fg)), cv2.MORPH_CLOSE, kernel)
    mask[invalid] = 0
    return mask


def _film_interior(mask: np.ndarray, valid: np.ndarray, margin: int) -> np.ndarray | None:
    """If ``mask`` is a film or a frame rather than a hand, the inside of its rectangle less
    ``margin`` pixels and 3 % (bool), else None.

    A film scanned inside a larger image is a solid (rotated) rectangle: area >= 85 % of its
    minimum-area rectangle (hands on the RSNA images: 35-50 %). A frame of film edges joined to
    the hand runs along its rectangle's outline: it covers >= 30 % of a band 2 ``margin`` + 1
    wide along the outline, where the image is valid (hands touch their box at a few places:
    at most 7 % on real images, 14 % on phantoms with bands; frames 33-92 %).
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    contour = max(contours, key=cv2.contourArea)
    (cx, cy), (rw, rh), angle = rect = cv2.minAreaRect(contour)
    if rw * rh <= 0:
        return None
    solid = np.count_nonzero(mask) >= 0.85 * rw * rh
    if not solid:
        ring = np.zeros(mask.shape, np.uint8)
        cv2.polylines(ring, [np.round(cv2.boxPoints(rect)).astype(np.int32)], True, 1, 2 * margin + 1)
        ring = (ring > 0) & valid
        if not ring.any() or np.mean(mask[ring] > 0) < 0.3:
            return None
    shrink = 2 * margin + 0.03 * min(rw, rh)
    if min(rw, rh) <= 2 * shrink:
        return None
    box = cv2.boxPoints(((cx, cy), (rw - 2 * shrink, rh - 2 * shrink), angle))
    inside = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(inside, np.round(box).astype(np.int32), 1)
    return inside > 0


def classical_mask(image: np.ndarray) -> np.ndarray:
    """Hand mask (uint8, 255 on the hand) without a network, for grey radiographs.

    Gaussian blur (sigma 0.4 % of the longer side); collimation bands along whole sides are
    found (:func:`collimation_bands`) and excluded; threshold halfway between the background
    level (median below Otsu's threshold) and Otsu's threshold (Otsu alone cuts into the thin
    soft tissue); bright strips along the sides of the thresholded image (film edges, frames)
    are dropped and the threshold taken again without them; a morphological opening (radius
    0.6 % of the longer side) detaches marker letters and noise; the largest connected
    component, its holes filled, closed with the same kernel. Markers (bright letters, often
    in a dark box) are separate, smaller components, so they drop out. If the result is a
    film scanned inside the image or a frame (see ``_film_interior``), the same is done again
    inside that rectangle (at most twice).
    """
    image = require_uint8(as_2d(np.asarray(image)), "classical_mask")
    if image.ndim != 2:
        raise ValueError(f"classical_mask needs a grey image, got shape {image.shape}")
    h, w = image.shape
    g = cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(1.0, 0.004 * max(h, w)))
    r = max(1, int(round(0.006 * max(h, w))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    invalid = collimation_bands(g) > 0
    mask = _segment(g, invalid, kernel)
    for _ in range(2):
        inside = _film_interior(mask, ~invalid, r)
        if inside is None:
            break
        invalid = invalid | ~inside
        mask = _segment(g, invalid, kernel)
    return mask


# ----------------------------------------------------------------------------- alignment


def _moments(mask: np.ndarray) -> dict:
    moments = cv2.moments((mask > 0).astype(np.uint8), binaryImage=True)
    if moments["m00"] == 0:
        raise ValueError("empty hand mask")
    return moments


def hand_angle(mask: np.ndarray) -> float:
    """Degrees, in (-90, 90], to rotate the image (counter-clockwise as ``affine_matrix``) so
    that the hand's long axis is vertical.

    The axis is the major axis of the ellipse with the second moments of the largest component
    (the region's moments, not ``cv2.fitEllipse`` on its contour: the least-squares fit to the
    outline is pulled about by the fingers and errs by up to 4.5 degrees between rotated copies
    of a phantom in the neutral pose, the moments by up to 1.5). The thumb pulls the axis a
    little off the middle finger (2 degrees on average). Whether the fingers then point up or
    down is :func:`upright_angle`'s business. ValueError for an empty mask.
    """
    m = _moments(largest_component(mask))
    theta = 0.5 * math.atan2(2.0 * m["mu11"], m["mu20"] - m["mu02"])  # major axis, from +x, y down
    tilt = math.degrees(math.atan2(math.cos(theta), -math.sin(theta)))  # clockwise from "up"
    return -_wrap(-tilt, 180.0)  # in (-90, 90]


def _wrap(angle: float, period: float) -> float:
    """``angle`` wrapped into [-period / 2, period / 2)."""
    return float((angle + 0.5 * period) % period - 0.5 * period)


def _keypoint(keypoints: np.ndarray | None, name: str) -> np.ndarray | None:
    if keypoints is None:
        return None
    point = np.asarray(keypoints, np.float64)[KEYPOINT_INDEX[name]]
    return point if np.all(np.isfinite(point)) else None


def _rotation(center: tuple[float, float], angle: float) -> np.ndarray:
    """2x3 rotation by ``angle`` degrees counter-clockwise on screen (``cv2.getRotationMatrix2D``)."""
    return cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(angle), 1.0)


def _fingers_score(mask: np.ndarray) -> float:
    """Positive when the fingers of a vertical mask point up, negative when down, 0 if unsure.

    The finger end is fragmented: rows across its outer 40 % cross more separate runs of the
    mask (spread fingers) than rows across the other end (one forearm); a difference under 0.5
    runs (fingers held together) is a tie.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size < 10:
        return 0.0
    top, bottom = rows[0], rows[-1]
    span = bottom - top

    def runs(lo: float, hi: float) -> float:
        band = (mask[int(top + lo * span):int(top + hi * span) + 1] > 0).astype(np.int8)
        return float(np.mean(np.count_nonzero(np.diff(band, axis=1) == 1, axis=1) + band[:, 0]))

    score = runs(0.02, 0.4) - runs(0.6, 0.98)
    if abs(score) >= 0.5:
        return score
    return 0.0


def upright_angle(mask: np.ndarray, keypoints: np.ndarray | None = None, *, source: str = "mask") -> float:
    """Degrees (counter-clockwise, in (-180, 180]) that rotate the hand upright, fingers up.

    ``source="mask"``: the long axis from :func:`hand_angle`; ``"keypoints"``: the direction
    capitate -> middle_tip (mcp3 if the tip is unknown). The axis has two ends: with keypoints
    (either source) the middle finger ends above the capitate; without, the finger end of the
    mask is the more fragmented one, or (a tie) the one away from the image border that the
    forearm crosses; still a tie, the smaller rotation wins.
    """
    capitate = _keypoint(keypoints, "capitate")
    tip = _keypoint(keypoints, "middle_tip")
    tip = tip if tip is not None else _keypoint(keypoints, "mcp3")
    if source == "keypoints":
        if capitate is None or tip is None:
            raise ValueError("upright_angle(source='keypoints') needs the capitate and middle_tip or mcp3")
        dx, dy = tip - capitate
        return float(math.degrees(math.atan2(dx, -dy)))
    if source != "mask":
        raise ValueError(f"upright_angle: source {source!r}; expected 'mask' or 'keypoints'")
    angle = hand_angle(mask)
    m = _moments(largest_component(mask))
    center = (m["m10"] / m["m00"], m["m01"] / m["m00"])
    matrix = _rotation(center, angle)
    if capitate is not None and tip is not None:
        (_, tip_y), (_, cap_y) = (matrix[:, :2] @ p + matrix[:, 2] for p in (tip, capitate))
        up = 1.0 if tip_y < cap_y else -1.0
    else:
        h, w = mask.shape
        rotated = cv2.warpAffine(largest_component(mask), matrix, (w, h), flags=cv2.INTER_NEAREST)
        up = _fingers_score(rotated)
        if up == 0.0:
            up = _border_score(mask, center, angle)
    if up < 0:
        angle = angle - 180.0 if angle > 0 else angle + 180.0
    return float(angle)


def _border_score(mask: np.ndarray, center: tuple[float, float], angle: float) -> float:
    """Positive when the mask touches the image border mostly below its centre once rotated by
    ``angle`` (the forearm end down, the fingers up); 0 if it does not touch the border."""
    h, w = mask.shape
    edge = np.zeros(mask.shape, bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    ys, xs = np.nonzero(edge & (mask > 0))
    if not ys.size:
        return 0.0
    a = math.radians(angle)
    up = np.array([-math.sin(a), -math.cos(a)])  # the direction that becomes "up" after rotation
    projection = (xs - center[0]) * up[0] + (ys - center[1]) * up[1]
    return float(-np.mean(projection))


# ----------------------------------------------------------------------------- ROI boxes


def _require(sample: Sample, names: tuple[str, ...], region: str) -> np.ndarray:
    keypoints = sample.get("keypoints")
    if keypoints is None:
        raise ValueError(f"roi_crop(region={region!r}) needs keypoints; sample id {sample.get('id')!r} has none")
    keypoints = np.asarray(keypoints, np.float64)
    missing = [n for n in names if not np.all(np.isfinite(keypoints[KEYPOINT_INDEX[n]]))]
    if missing:
        raise ValueError(f"roi_crop(region={region!r}): sample id {sample.get('id')!r} lacks keypoint(s) {missing}")
    return keypoints


def _padded_box(points: np.ndarray, pad: float) -> np.ndarray:
    points = points[np.all(np.isfinite(points), axis=1)]
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    return np.array([x0 - dx, y0 - dy, x1 + dx, y1 + dy])


def _sample_mask(sample: Sample) -> np.ndarray:
    mask = sample.get("mask")
    return mask if mask is not None else classical_mask(sample["image"])


def roi_box(sample: Sample, region: str = "hand", margin: float = 1.15) -> tuple[float, float, float, float]:
    """The crop box (x0, y0, x1, y1) in pixels of a region of interest; it may reach past the
    image (``crop_sample`` fills there).

    * ``"hand"``: the bounding box of the hand mask (``classical_mask`` if the sample has
      none), scaled by ``margin`` about its centre (1.15 as Deeplasia); not made square.
    * ``"roi1"``, carpals and metacarpals (Lee et al.): the bounding box of the distal radius
      and ulna and the five proximal phalanx bases (required), with the carpals and metacarpal
      heads (which lie inside; used where known), padded by 5 % of its width / height on each
      side so that the bounding bones are not cut through their centres.
    * ``"roi2"``: ROI1 grown by 30 % of its width / height on the three sides away from the
      wrist. The wrist side is the box side that the direction capitate -> midpoint of radius
      and ulna points to (the bottom for an upright hand); it is shared with ROI1.
    * ``"roi3"``, phalanges, carpals and metacarpals: the bounding box of all 25 keypoints but
      the radius and ulna (fingertips included; all required), padded by 5 % as ROI1.

    ``margin`` applies only to "hand". Raises ValueError naming the sample id where needed
    keypoints are missing or NaN, and for an empty mask.
    """
    if region == "hand":
        mask = _sample_mask(sample)
        if not np.any(mask):
            raise ValueError(f"roi_crop(region='hand'): empty hand mask in sample id {sample.get('id')!r}")
        x, y, w, h = cv2.boundingRect((mask > 0).astype(np.uint8))
        cx, cy = x + 0.5 * w, y + 0.5 * h
        half_w, half_h = 0.5 * margin * w, 0.5 * margin * h
        return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    if region in ("roi1", "roi2"):
        keypoints = _require(sample, _ROI1_REQUIRED + (("capitate",) if region == "roi2" else ()), region)
        names = _ROI1_REQUIRED + _ROI1_INSIDE
        box = _padded_box(keypoints[[KEYPOINT_INDEX[n] for n in names]], _ROI_PAD)
        if region == "roi2":
            wrist = 0.5 * (keypoints[KEYPOINT_INDEX["radius_distal"]] + keypoints[KEYPOINT_INDEX["ulna_distal"]])
            dx, dy = wrist - keypoints[KEYPOINT_INDEX["capitate"]]
            side = (3 if dy > 0 else 1) if abs(dy) >= abs(dx) else (2 if dx > 0 else 0)  # x0 y0 x1 y1
            grow = _ROI2_GROWTH * np.array([box[2] - box[0], box[3] - box[1]] * 2) * np.array([-1, -1, 1, 1])
            grow[side] = 0.0
            box = box + grow
        return tuple(float(v) for v in box)
    if region == "roi3":
        keypoints = _require(sample, _ROI3_REQUIRED, region)
        box = _padded_box(keypoints[[KEYPOINT_INDEX[n] for n in _ROI3_REQUIRED]], _ROI_PAD)
        return tuple(float(v) for v in box)
    raise ValueError(f"roi_crop: region {region!r}; expected one of {ROI_REGIONS}")


# ----------------------------------------------------------------------------- sample ops


def _cache_path(cache_dir: str, sample_id) -> str:
    if isinstance(sample_id, bytes):
        sample_id = sample_id.decode()
    elif isinstance(sample_id, (np.integer, np.ndarray)):
        sample_id = np.asarray(sample_id).item()
    return os.path.join(cache_dir, f"{sample_id}.png")


def _hand_mask_requires(arguments: dict) -> frozenset[str]:
    """A stored mask (the dataset's or a cached file) unless the mask is classical."""
    return frozenset({"mask"}) if arguments["source"] in ("dataset", "cache") else frozenset()


def _hand_mask_classical(kwargs: dict) -> dict:
    """Spec arguments that make the mask from the image instead of reading a stored one."""
    return {**{k: v for k, v in kwargs.items() if k != "cache_dir"}, "source": "classical"}


@register_preprocess("hand_mask", on="sample", geometric=False, reads=("mask",),
                     config_defaults={"cache_dir": "mask_cache"}, requires=_hand_mask_requires,
                     without_mask=_hand_mask_classical)
def hand_mask(sample: Sample, *, source: str = "dataset", cache_dir: str = "", apply: bool = True,
              fill_value: int = 0) -> Sample:
    """Sets ``sample["mask"]`` (uint8, 255 on the hand) from ``source``:

    * ``"dataset"``: the mask the sample already has (the TFDS builder's); ValueError if none.
    * ``"classical"``: :func:`classical_mask` of the image.
    * ``"cache"``: ``<cache_dir>/<id>.png`` (e.g. U-Net predictions), resized with nearest
      neighbour to the image if needed and binarised at 128; FileNotFoundError if missing.
      The cached masks match the stored images, so put ``hand_mask`` before any geometric op
      (resize, crop, align) in the spec.

    With ``apply`` the background (mask 0) of the image is set to ``fill_value``.
    """
    image = sample["image"]
    height, width = image.shape[:2]
    if source == "dataset":
        mask = sample.get("mask")
        if mask is None:
            raise ValueError(f"hand_mask(source='dataset'): sample id {sample.get('id')!r} has no mask")
    elif source == "classical":
        mask = classical_mask(image)
    elif source == "cache":
        path = _cache_path(cache_dir, sample.get("id"))
        mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(
                f"hand_mask(source='cache'): no mask file {path} for sample id {sample.get('id')!r}")
        if mask.shape != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        mask = np.where(mask >= 128, 255, 0).astype(np.uint8)
    else:
        raise ValueError(f"hand_mask: source {source!r}; expected 'dataset', 'classical' or 'cache'")
    out = {**sample, "mask": mask}
    if apply:
        keep = (mask > 0).reshape(mask.shape + (1,) * (image.ndim - 2))
        out["image"] = np.where(keep, image, np.asarray(fill_value, image.dtype))
    return out


_ALIGN_SIDE = 128  # pixels: the mask size on which align finds the angle


@register_preprocess("align", on="sample", geometric=True, reads=("mask", "keypoints"),
                     requires=lambda arguments: frozenset({"keypoints"} if arguments["source"] == "keypoints" else ()))
def align(sample: Sample, *, fill_mode: str = "constant", fill_value: int = 0, source: str = "mask") -> Sample:
    """Rotates the sample (image, mask, keypoints; same canvas) so the hand is upright, fingers
    up (:func:`upright_angle`): about the mask's centroid with ``source="mask"`` (the sample's
    mask, or ``classical_mask`` if it has none; that mask is not added to the sample), about the
    capitate with ``source="keypoints"``. An empty mask leaves the sample as it is."""
    mask = _sample_mask(sample) if source == "mask" else sample.get("mask")
    keypoints = sample.get("keypoints")
    if source == "keypoints":
        if _keypoint(keypoints, "capitate") is None:
            raise ValueError(f"align(source='keypoints'): sample id {sample.get('id')!r} lacks the capitate")
        center = tuple(_keypoint(keypoints, "capitate"))
        angle = upright_angle(mask, keypoints, source="keypoints")
    elif source == "mask":
        if not np.any(mask):
            return sample  # nothing to align by
        # The angle does not depend on the scale: find it on a mask of at most 128 px (16x less
        # work at 512 px), with the keypoints scaled alike.
        scale = min(1.0, _ALIGN_SIDE / max(mask.shape))
        if scale < 1.0:
            size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
            small = (cv2.resize(mask, size, interpolation=cv2.INTER_AREA) > 127).astype(np.uint8) * 255
            if not np.any(small):
                small, scale = mask, 1.0
        else:
            small = mask
        m = _moments(largest_component(small))
        center = (m["m10"] / m["m00"] / scale, m["m01"] / m["m00"] / scale)
        angle = upright_angle(small, None if keypoints is None else np.asarray(keypoints) * scale)
    else:
        raise ValueError(f"align: source {source!r}; expected 'mask' or 'keypoints'")
    height, width = sample["image"].shape[:2]
    return warp_sample(sample, _rotation(center, angle), (width, height), fill_mode=fill_mode,
                       fill_value=fill_value)


@register_preprocess("roi_crop", on="sample", geometric=True, reads=("mask", "keypoints"),
                     config_defaults={"region": "roi"},
                     requires=lambda arguments: frozenset({"keypoints"} if arguments["region"] != "hand" else ()))
def roi_crop(sample: Sample, *, region: str = "hand", margin: float = 1.15, fill_value: int = 0) -> Sample:
    """Crops a region of interest (see :func:`roi_box`: "hand", "roi1", "roi2", "roi3"); the
    mask and keypoints are cropped with it, parts past the image are ``fill_value``."""
    return crop_sample(sample, roi_box(sample, region, margin), fill_value=fill_value)


@register_preprocess("suppress_markers", on="sample", geometric=False, reads=("mask",))
def suppress_markers(sample: Sample, *, source: str = "mask", fill_value: int = 0, dilate: float = 0.02) -> Sample:
    """Blanks burned-in markers and collimation borders: pixels farther than ``dilate`` x the
    longer side from the hand mask become ``fill_value`` (soft-tissue edges survive, unlike
    ``hand_mask(apply=True)``). ``source``: "mask" (the sample's, or ``classical_mask`` if it
    has none) or "classical". The sample's mask is left as it is."""
    if source == "mask":
        mask = _sample_mask(sample)
    elif source == "classical":
        mask = classical_mask(sample["image"])
    else:
        raise ValueError(f"suppress_markers: source {source!r}; expected 'mask' or 'classical'")
    image = sample["image"]
    radius = int(round(dilate * max(image.shape[:2])))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate((mask > 0).astype(np.uint8), kernel)
    keep = (mask > 0).reshape(mask.shape + (1,) * (image.ndim - 2))
    return {**sample, "image": np.where(keep, image, np.asarray(fill_value, image.dtype))}

"""Whether an image is a hand radiograph that a model can read, before it reads it.

:func:`rejection` runs the checks in this order and returns the first that fails as a
:class:`Rejection` (a ``reason`` of :data:`REASONS` and the measured details), or None;
:func:`unusable_reason` gives it as one line, ``"REASON: details"``. ``predict`` and the web
service answer ``rejected: REASON: details`` instead of a bone age unless forced, and
``evaluate --quality`` counts what a dataset would lose.

1. ``too small``, ``aspect ratio``, ``no contrast``: on the image as it is (the shortest side
   below half the network's input, at most 64 px; a strip; 98 % of the pixels within 16 grey
   levels).
2. ``colour photograph``: many pixels whose colour channels differ. A grey radiograph stored as
   RGB has equal channels (and ``boneage_jax.io`` reads it as grey); a photograph is coloured.
   This needs the file's colour, which ``io.read_image(colour=True)`` keeps; datasets store grey.

The rest read the image shrunk to at most :data:`ANALYSIS_SIDE` px and its hand mask, the
classical Otsu mask of ``boneage_jax.ops.hand`` (:func:`~boneage_jax.ops.hand.classical_mask`):

3. ``noise``: most of the grey-level variance is pixel-to-pixel (a radiograph's grey levels
   change smoothly at this scale; uniform or Gaussian noise is all pixel scale).
4. ``mostly blank``: most of the image within a few grey levels of one value.
5. ``no hand found`` / ``not a hand``: the mask covers too little / too much of the image.
6. ``inverted``: the image fails one of the hand checks (5, 7, 8) and its negative passes them
   all: a dark hand on a bright background. (Deciding from the border's brightness alone
   fails on radiographs with bright collimation bands or a film inside a grey surround, and
   calls any bright-bordered picture inverted.)
7. ``no dark background``: the hand region is not clearly brighter than the rest of the image
   (the background: the border and whatever else lies outside the mask; its median, so bands
   along a side do not move it). A grey photograph, a drawing, a scan of something else.
8. ``not hand-shaped``: the mask fills most of its convex hull (a disc, a rectangle, a trunk)
   or has fewer than :data:`MIN_FINGER_GAPS` deep gaps between protrusions (fingers).

A hand rotated by 90 or 180 degrees, or mirrored, passes: nothing depends on the orientation.

What is not detected: the checks see a bright, hand-sized region with finger-like gaps on a
dark background, and know no anatomy. A foot (toes make gaps), another limb whose mask has
deep concavities, two hands on one film, a hand-sized blob on a "wrist" (it has the solidity
and the two gaps of a real hand with closed fingers: 0.87 and 2 in the real sample), motion
blur, a wrong side or an over-exposed hand can pass. A chest, skull or pelvis radiograph is
rejected only as far as its mask is a solid blob (``not hand-shaped``) or covers most of the
image (``not a hand``).

The thresholds (each constant says where its values lie) were set from the first 120 (by file
name) of the 599 real RSNA radiographs in ``../shared/rsna_sample`` (all accepted; their
negatives all rejected as inverted) and 48 phantoms (``tfds_rsna.phantom`` with random
nuisance at 160x128 and 320x256, upright, rotated by 90 degrees and inverted), with margins
on both sides, against the images that must fail. ``tests/test_quality.py`` asserts the same
of all 599 (at their size and shrunk to 512 px) and of the images that must fail.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from boneage_jax.ops import as_2d
from boneage_jax.ops.hand import classical_mask

# The reasons, in the order of the checks, and what each means.
REASONS = {
    "too small": "the shortest side is below half the network's input (at most 64 px needed)",
    "aspect ratio": "a strip: the longest side over the shortest is above MAX_ASPECT_RATIO",
    "no contrast": "98% of the pixels within MIN_CONTRAST grey levels: blank or uniform",
    "colour photograph": "many pixels whose colour channels differ: a photograph, not a grey radiograph",
    "noise": "most of the grey-level variance is pixel-to-pixel noise",
    "mostly blank": "most of the image lies within a few grey levels of one value",
    "no hand found": "the hand mask covers too little of the image",
    "not a hand": "the bright region covers most of the image",
    "inverted": "a dark hand on a bright background: the image fails the hand checks, its negative passes",
    "no dark background": "the hand region is not clearly brighter than the rest of the image",
    "not hand-shaped": "the mask is a solid blob, or has too few gaps between finger-like protrusions",
}

MAX_ASPECT_RATIO = 5.0  # longest over shortest side; hand radiographs are about 1.2-1.6
MIN_CONTRAST = 16  # grey levels between the 1st and 99th percentile of a uint8 image
LARGEST_MIN_SIDE = 64  # px: the shortest side never needs more than this

ANALYSIS_SIDE = 256  # px: the checks after the size checks read the image at most this large
COLOUR_SPREAD = 24  # grey levels between a pixel's channels that make it coloured
BLANK_LEVELS = 4  # grey levels either side of the most common one that count as blank
GAP_DEPTH = 0.15  # of sqrt(mask area): how deep a convexity defect must be to count as a finger gap

# Thresholds: where the real radiographs ("real": the first 120 of the sample, see the module
# docstring), the phantoms and the images that must fail lie.
MAX_COLOUR_FRACTION = 0.2  # real and phantoms 0 (grey); chelsea 0.95, coffee 0.92, astronaut 0.42
MAX_NOISE_FRACTION = 0.4  # real <= 0.14, phantoms <= 0.08; uniform and Gaussian noise >= 0.93
MAX_BLANK_FRACTION = 0.9  # real <= 0.75, phantoms <= 0.71 (dark backgrounds); a blank film with a marker 0.97+
MIN_HAND_FRACTION = 0.08  # real >= 0.175, phantoms >= 0.21
MAX_HAND_FRACTION = 0.7  # real <= 0.42, phantoms <= 0.32
MIN_LEVEL_GAP = 0.2  # hand minus background, 0-1 of the grey range: real >= 0.26, phantoms >= 0.42; chelsea 0.14
MAX_SOLIDITY = 0.92  # real <= 0.87 (fingers closed), phantoms <= 0.69; discs, rectangles, a chest 0.99+
MIN_FINGER_GAPS = 2  # real >= 2 (fingers closed), phantoms >= 5; discs, rectangles, a chest 0


@dataclasses.dataclass(frozen=True)
class Rejection:
    """Why the check rejects an image: a ``reason`` of :data:`REASONS` and its measured details."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Measures:
    """What checks 3-8 read (:func:`measure`); levels are 0-1 of the image's 1-99 percentile range."""

    noise_fraction: float  # of the grey-level variance, the part at the pixel scale
    blank_fraction: float  # pixels within BLANK_LEVELS of the most common grey level
    hand_fraction: float  # of the image, under the hand mask
    solidity: float  # mask area over its convex hull's
    finger_gaps: int  # convexity defects deeper than GAP_DEPTH x sqrt(mask area)
    hand_level: float  # median grey level under the mask (NaN without a mask)
    background_level: float  # median grey level outside the mask (NaN if it covers everything)


# ----------------------------------------------------------------------------- measures


def min_side(image_size: int) -> int:
    """The shortest side an image needs: half the network's input, at most 64 px."""
    return max(8, min(LARGEST_MIN_SIDE, image_size // 2))


def grey(image: np.ndarray) -> np.ndarray:
    """A uint8 image (H, W), (H, W, 1), BGR (H, W, 3) or BGRA (H, W, 4) -> grey (H, W)."""
    image = as_2d(np.asarray(image))
    if image.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, :3]), cv2.COLOR_BGR2GRAY)
    return image


def analysis_image(image: np.ndarray, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """The image shrunk (area interpolation) so that its longest side is at most ``side``."""
    height, width = image.shape[:2]
    scale = side / max(height, width)
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def colour_fraction(image: np.ndarray) -> float:
    """Fraction of pixels whose colour channels differ by more than ``COLOUR_SPREAD`` grey
    levels: 0 for a grey image, and for a grey radiograph stored as RGB."""
    image = as_2d(np.asarray(image))
    if image.ndim == 2:
        return 0.0
    channels = image[:, :, :3].astype(np.int16)
    return float(np.mean(channels.max(axis=2) - channels.min(axis=2) > COLOUR_SPREAD))


def noise_fraction(image: np.ndarray) -> float:
    """The part of a grey image's variance that a Gaussian blur of sigma 2 px removes: about 1
    for pixel noise, a few percent for a radiograph, whose grey levels change smoothly."""
    g = image.astype(np.float32)
    variance = float(np.var(g))
    if variance <= 0.0:
        return 0.0
    return float(np.var(g - cv2.GaussianBlur(g, (0, 0), 2.0)) / variance)


def blank_fraction(image: np.ndarray) -> float:
    """Fraction of pixels within ``BLANK_LEVELS`` grey levels of the image's most common level."""
    counts = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    window = np.convolve(counts, np.ones(2 * BLANK_LEVELS + 1), mode="same")
    return float(window.max() / image.size)


def hand_shape(mask: np.ndarray) -> tuple[float, float, int]:
    """(area fraction, solidity, finger gaps) of a mask (nonzero inside): its share of the
    image; its area over that of the convex hull of its largest outline; the convexity defects
    of that outline deeper than ``GAP_DEPTH`` x sqrt(area) (the gaps between spread fingers)."""
    binary = (mask > 0).astype(np.uint8)
    area = int(np.count_nonzero(binary))
    if area == 0:
        return 0.0, 0.0, 0
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    solidity = min(1.0, area / max(float(cv2.contourArea(cv2.convexHull(contour))), 1.0))
    gaps = 0
    if len(contour) >= 4:
        try:
            defects = cv2.convexityDefects(contour, cv2.convexHull(contour, returnPoints=False))
        except cv2.error:  # a hull whose order OpenCV rejects (thin, self-touching outlines)
            defects = None
        if defects is not None:
            depths = defects.reshape(-1, 4)[:, 3] / 256.0  # fixed point, 8 fractional bits
            gaps = int(np.sum(depths > GAP_DEPTH * np.sqrt(area)))
    return area / mask.size, float(solidity), gaps


def levels(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(hand, background): the median grey level under the mask and outside it (NaN where
    there is none), each 0-1 of the image's 1-99 percentile range. The background's median is
    that of its larger part: a collimation band or a marker along a side does not move it."""
    low, high = np.percentile(image, [1, 99])
    span = max(float(high - low), 1.0)
    inside = mask > 0
    hand_level = (float(np.median(image[inside])) - low) / span if inside.any() else float("nan")
    background_level = (float(np.median(image[~inside])) - low) / span if not inside.all() else float("nan")
    return hand_level, background_level


def measure(image: np.ndarray) -> Measures:
    """Checks 3-8's measures of a grey analysis image (:func:`analysis_image`)."""
    mask = classical_mask(image)
    area, solidity, gaps = hand_shape(mask)
    hand_level, background_level = levels(image, mask)
    return Measures(noise_fraction=noise_fraction(image), blank_fraction=blank_fraction(image),
                    hand_fraction=area, solidity=solidity, finger_gaps=gaps, hand_level=hand_level,
                    background_level=background_level)


# ----------------------------------------------------------------------------- checks


def _hand_rejection(m: Measures) -> Rejection | None:
    """Checks 5, 7 and 8: the mask's size, its brightness against the background, its shape."""
    if m.hand_fraction < MIN_HAND_FRACTION:
        return Rejection("no hand found", f"the hand mask covers {m.hand_fraction:.1%} of the image; at least "
                                          f"{MIN_HAND_FRACTION:.0%}")
    if m.hand_fraction > MAX_HAND_FRACTION:
        return Rejection("not a hand", f"the bright region covers {m.hand_fraction:.0%} of the image; at most "
                                       f"{MAX_HAND_FRACTION:.0%}")
    if m.hand_level - m.background_level < MIN_LEVEL_GAP:
        return Rejection("no dark background", f"the hand region is {m.hand_level - m.background_level:.2f} of "
                                               f"the image's grey range brighter than the rest; at least "
                                               f"{MIN_LEVEL_GAP:g}")
    if m.solidity > MAX_SOLIDITY:
        return Rejection("not hand-shaped", f"the mask fills {m.solidity:.0%} of its convex hull (a blob, not a "
                                            f"hand with fingers); at most {MAX_SOLIDITY:.0%}")
    if m.finger_gaps < MIN_FINGER_GAPS:
        return Rejection("not hand-shaped", f"{m.finger_gaps} gap(s) between finger-like protrusions of the mask; "
                                            f"at least {MIN_FINGER_GAPS}")
    return None


def rejection(image: np.ndarray, image_size: int) -> Rejection | None:
    """The first check (see the module docstring) that a uint8 image, grey ((H, W) or
    (H, W, 1)) or BGR, fails for a network of input ``image_size``; None if it passes all."""
    image = as_2d(np.asarray(image))
    height, width = image.shape[:2]
    shortest, longest = min(height, width), max(height, width)
    needed = min_side(image_size)
    if shortest < needed:
        return Rejection("too small", f"{width}x{height} px; the shortest side needs at least {needed} px "
                                      f"(the network reads {image_size} px)")
    if longest / shortest > MAX_ASPECT_RATIO:
        return Rejection("aspect ratio", f"{longest / shortest:.1f} (a {width}x{height} strip); at most "
                                         f"{MAX_ASPECT_RATIO:g}")
    g = grey(image)
    low, high = np.percentile(g, [1, 99])
    if high - low < MIN_CONTRAST:
        return Rejection("no contrast", f"98% of the pixels lie within {high - low:.0f} grey levels (blank or "
                                        f"uniform image); at least {MIN_CONTRAST} needed")
    coloured = colour_fraction(image)
    if coloured > MAX_COLOUR_FRACTION:
        return Rejection("colour photograph", f"{coloured:.0%} of the pixels are coloured (a radiograph is grey); "
                                              f"at most {MAX_COLOUR_FRACTION:.0%}")
    small = analysis_image(g)
    m = measure(small)
    if m.noise_fraction > MAX_NOISE_FRACTION:
        return Rejection("noise", f"{m.noise_fraction:.0%} of the grey-level variance is pixel-to-pixel; at most "
                                  f"{MAX_NOISE_FRACTION:.0%}")
    if m.blank_fraction > MAX_BLANK_FRACTION:
        return Rejection("mostly blank", f"{m.blank_fraction:.0%} of the image lies within {BLANK_LEVELS} grey "
                                         f"levels of one value; at most {MAX_BLANK_FRACTION:.0%}")
    found = _hand_rejection(m)
    if found is not None:
        negative = measure(255 - small)
        if _hand_rejection(negative) is None:  # a dark hand on a bright background
            return Rejection("inverted", f"a dark hand on a bright background: the negative passes the hand "
                                         f"checks (its hand region {negative.hand_level - negative.background_level:.2f}"
                                         f" of the grey range brighter than the rest) that the image fails "
                                         f"({found.reason})")
    return found


def unusable_reason(image: np.ndarray, image_size: int) -> str | None:
    """Why a uint8 image (grey or BGR) is not a hand radiograph that a network of input
    ``image_size`` can read (``"REASON: details"``, :func:`rejection`); None if it is."""
    found = rejection(image, image_size)
    return None if found is None else str(found)

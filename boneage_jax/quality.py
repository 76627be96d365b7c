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

The rest read the image shrunk to at most :data:`ANALYSIS_SIDE` px, and the classical Otsu hand
mask of ``boneage_jax.ops.hand`` (:func:`~boneage_jax.ops.hand.classical_mask`) of the image
and of its negative:

3. ``noise``: most of the grey-level variance is pixel-to-pixel (a radiograph's grey levels
   change smoothly at this scale; uniform or Gaussian noise is all pixel scale).
4. ``mostly blank``: most of the image within a few grey levels of one value.
5. ``inverted``: the evidence that the background is dark (:func:`polarity`) says the image is
   a negative, and the negative passes the hand checks 6-7. The evidence is a weighted sum of
   six comparisons of the image with its negative: the border's median level, the most common
   level, the mean level, how much brighter the mask region is than the rest, the gaps between
   finger-like protrusions of the mask and its solidity. Each term changes sign with the
   negative, so :func:`polarity` of a negative is minus that of the image. No one term
   separates the real radiographs from their negatives (a film inside a bright surround, a grey
   film background, closed fingers); the sum does for all but one of the 599 real radiographs.
   ``no dark background``: the evidence is weak either way (below :data:`MIN_POLARITY`), or
   favours the negative but the negative is no hand either: many grey photographs and drawings.
6. ``no hand found`` / ``not a hand``: the mask covers too little / too much of the image.
7. ``not hand-shaped``: the mask fills nearly all of its convex hull (a disc, a rectangle, a
   trunk). Closed fingers make real hands solid too (up to 0.93), so a hand is not required to
   show finger gaps.

A hand rotated by 90 or 180 degrees, or mirrored, passes: nothing depends on the orientation.

What is not detected: the checks see a bright region of plausible size on a darker background
that is not a solid blob, and know no anatomy. A foot, another limb, two hands on one film, a
hand-sized blob on a "wrist", motion blur, a wrong side or an over-exposed hand can pass, and so
can a grey photograph with a dark background: of scikit-image's pictures in grey, ``astronaut``,
``rocket``, ``cell`` and ``clock`` pass (in colour, ``colour photograph`` rejects them). A chest, skull or pelvis
radiograph is rejected only as far as its mask is a solid blob (``not hand-shaped``) or covers
most of the image (``not a hand``).

The thresholds and the weights of :func:`polarity` come from the 599 real RSNA radiographs in
``../shared/rsna_sample`` and their negatives (the weights: a logistic regression without
intercept on the six terms, rounded to halves; 5-fold cross-validation put the same single
radiograph on the wrong side), 48 phantoms (``tfds_rsna.phantom`` with random nuisance at
160x128 and 320x256, upright, rotated by 90 degrees and inverted) and the images that must fail,
each constant with where its values lie. One real radiograph is rejected: ``3339.png``, a film
photographed on a bright light box, whose negative looks like a radiograph by every measure
here (its mask also misses the hand). ``tests/test_quality.py`` asserts this of all 599 (at
their size and shrunk to 512 px) and of the images that must fail.
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
    "inverted": "a dark hand on a bright background: the evidence for a dark background favours the negative",
    "no dark background": "too little evidence that the background is dark, as a radiograph's is",
    "no hand found": "the hand mask covers too little of the image",
    "not a hand": "the bright region covers most of the image",
    "not hand-shaped": "the mask is a solid blob",
}

MAX_ASPECT_RATIO = 5.0  # longest over shortest side; hand radiographs are about 1.2-1.6
MIN_CONTRAST = 16  # grey levels between the 1st and 99th percentile of a uint8 image
LARGEST_MIN_SIDE = 64  # px: the shortest side never needs more than this

ANALYSIS_SIDE = 256  # px: the checks after the size checks read the image at most this large
COLOUR_SPREAD = 24  # grey levels between a pixel's channels that make it coloured
BLANK_LEVELS = 4  # grey levels either side of the most common one that count as blank
GAP_DEPTH = 0.15  # of sqrt(mask area): how deep a convexity defect must be to count as a finger gap

BORDER = 0.04  # of the shorter side: the frame whose median is the border level

# Thresholds: where the 599 real radiographs ("real", see the module docstring), the phantoms
# and the images that must fail lie.
MAX_COLOUR_FRACTION = 0.2  # real and phantoms 0 (grey); chelsea 0.95, coffee 0.92, astronaut 0.42
MAX_NOISE_FRACTION = 0.7  # real <= 0.43, phantoms <= 0.08; uniform and Gaussian noise >= 0.93
MAX_BLANK_FRACTION = 0.9  # real <= 0.79, phantoms <= 0.71 (dark backgrounds); a blank film with a marker 0.97+
MIN_HAND_FRACTION = 0.04  # real >= 0.083, phantoms >= 0.21
MAX_HAND_FRACTION = 0.7  # real <= 0.44, phantoms <= 0.32
MAX_SOLIDITY = 0.96  # real <= 0.925 (fingers closed), phantoms <= 0.69; discs, rectangles, a chest 0.99+

# polarity(): the weight of each term (each 0-1 or -1-1, positive for a dark background).
POLARITY_WEIGHTS = {
    "border": 1.5,  # 0.5 minus the border's median level
    "mode": 1.5,  # 0.5 minus the most common level
    "mean": 1.0,  # 0.5 minus the mean level
    "level gap": 1.0,  # (hand minus background level) of the image minus that of its negative
    "finger gaps": 2.5,  # (finger gaps of the image minus those of its negative) / 6
    "solidity": 0.5,  # solidity of the negative's mask minus the image's
}
# Real radiographs: polarity >= 0.73 for 598 of 599 (3339.png: -2.0), phantoms >= 3.0 (their
# negatives: minus that); grey photographs of scikit-image between -4.1 and +1.9.
MIN_POLARITY = 0.5  # below: "no dark background"; at most minus this, with a negative that passes: "inverted"


@dataclasses.dataclass(frozen=True)
class Rejection:
    """Why the check rejects an image: a ``reason`` of :data:`REASONS` and its measured details."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class Measures:
    """What checks 3-7 read (:func:`measure`); levels are 0-1 of the image's 1-99 percentile range."""

    noise_fraction: float  # of the grey-level variance, the part at the pixel scale
    blank_fraction: float  # pixels within BLANK_LEVELS of the most common grey level
    hand_fraction: float  # of the image, under the hand mask
    solidity: float  # mask area over its convex hull's
    finger_gaps: int  # convexity defects deeper than GAP_DEPTH x sqrt(mask area)
    hand_level: float  # median grey level under the mask (NaN without a mask)
    background_level: float  # median grey level outside the mask (NaN if it covers everything)
    border_level: float  # median grey level of the image's frame, BORDER of the shorter side wide
    mode_level: float  # the most common grey level (BLANK_LEVELS either side counted with it)
    mean_level: float  # the mean grey level

    @property
    def level_gap(self) -> float:
        """How much brighter the mask region is than the rest (-1 where either is missing)."""
        gap = self.hand_level - self.background_level
        return -1.0 if np.isnan(gap) else gap


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


def _level_window(image: np.ndarray) -> np.ndarray:
    """Per grey level, the pixels within ``BLANK_LEVELS`` of it."""
    counts = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    return np.convolve(counts, np.ones(2 * BLANK_LEVELS + 1), mode="same")


def blank_fraction(image: np.ndarray) -> float:
    """Fraction of pixels within ``BLANK_LEVELS`` grey levels of the image's most common level."""
    return float(_level_window(image).max() / image.size)


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


def grey_range(image: np.ndarray) -> tuple[float, float]:
    """(low, span): the image's 1st percentile and the distance to its 99th (at least 1), the
    scale on which :class:`Measures` gives levels."""
    low, high = np.percentile(image, [1, 99])
    return float(low), max(float(high - low), 1.0)


def _relative(level: float, scale: tuple[float, float]) -> float:
    """A grey level as 0-1 of the range ``scale`` (:func:`grey_range`)."""
    low, span = scale
    return (level - low) / span


def levels(image: np.ndarray, mask: np.ndarray, scale: tuple[float, float] | None = None) -> tuple[float, float]:
    """(hand, background): the median grey level under the mask and outside it (NaN where
    there is none), each 0-1 of the image's 1-99 percentile range (``scale``, else computed).
    The background's median is that of its larger part: a collimation band or a marker along a
    side does not move it."""
    scale = scale or grey_range(image)
    inside = mask > 0
    hand_level = _relative(float(np.median(image[inside])), scale) if inside.any() else float("nan")
    background_level = _relative(float(np.median(image[~inside])), scale) if not inside.all() else float("nan")
    return hand_level, background_level


def border_level(image: np.ndarray, scale: tuple[float, float] | None = None) -> float:
    """The median grey level of the image's frame, ``BORDER`` of its shorter side wide (at
    least 2 px), 0-1 of the 1-99 percentile range (``scale``, else computed)."""
    b = max(2, int(BORDER * min(image.shape[:2])))
    frame = np.concatenate([image[:b].ravel(), image[-b:].ravel(), image[:, :b].ravel(), image[:, -b:].ravel()])
    return _relative(float(np.median(frame)), scale or grey_range(image))


def measure(image: np.ndarray) -> Measures:
    """Checks 3-7's measures of a grey analysis image (:func:`analysis_image`)."""
    mask = classical_mask(image)
    area, solidity, gaps = hand_shape(mask)
    scale = grey_range(image)
    hand_level, background_level = levels(image, mask, scale)
    return Measures(noise_fraction=noise_fraction(image), blank_fraction=blank_fraction(image),
                    hand_fraction=area, solidity=solidity, finger_gaps=gaps, hand_level=hand_level,
                    background_level=background_level, border_level=border_level(image, scale),
                    mode_level=_relative(float(np.argmax(_level_window(image))), scale),
                    mean_level=_relative(float(np.mean(image)), scale))


def polarity_terms(image: Measures, negative: Measures) -> dict[str, float]:
    """The terms of :func:`polarity` (keys of :data:`POLARITY_WEIGHTS`), each positive where
    the image has the darker background and of opposite sign with the two swapped."""
    return {
        "border": 0.5 * (negative.border_level - image.border_level),
        "mode": 0.5 * (negative.mode_level - image.mode_level),
        "mean": 0.5 * (negative.mean_level - image.mean_level),
        "level gap": image.level_gap - negative.level_gap,
        "finger gaps": (image.finger_gaps - negative.finger_gaps) / 6.0,
        "solidity": negative.solidity - image.solidity,
    }


def polarity(image: Measures, negative: Measures) -> float:
    """Evidence that the image, not its negative, is the radiograph (a dark background): above
    0 for all real radiographs of the sample but one, minus itself with the two swapped."""
    terms = polarity_terms(image, negative)
    return float(sum(POLARITY_WEIGHTS[k] * v for k, v in terms.items()))


# ----------------------------------------------------------------------------- checks


def _hand_rejection(m: Measures) -> Rejection | None:
    """Checks 6 and 7: the mask's size and its shape."""
    if m.hand_fraction < MIN_HAND_FRACTION:
        return Rejection("no hand found", f"the hand mask covers {m.hand_fraction:.1%} of the image; at least "
                                          f"{MIN_HAND_FRACTION:.0%}")
    if m.hand_fraction > MAX_HAND_FRACTION:
        return Rejection("not a hand", f"the bright region covers {m.hand_fraction:.0%} of the image; at most "
                                       f"{MAX_HAND_FRACTION:.0%}")
    if m.solidity > MAX_SOLIDITY:
        return Rejection("not hand-shaped", f"the mask fills {m.solidity:.0%} of its convex hull (a blob, not a "
                                            f"hand); at most {MAX_SOLIDITY:.0%}")
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
    negative = measure(255 - small)
    evidence = polarity(m, negative)
    if evidence <= -MIN_POLARITY and _hand_rejection(negative) is None:
        return Rejection("inverted", f"a dark hand on a bright background: the evidence for a dark background "
                                     f"is {evidence:.2f} for the image and {-evidence:.2f} for its negative, "
                                     f"which passes the hand checks")
    if evidence < MIN_POLARITY:
        return Rejection("no dark background", f"the evidence that the background is dark (as a radiograph's) "
                                               f"is {evidence:.2f}; at least {MIN_POLARITY:g}")
    return _hand_rejection(m)


def unusable_reason(image: np.ndarray, image_size: int) -> str | None:
    """Why a uint8 image (grey or BGR) is not a hand radiograph that a network of input
    ``image_size`` can read (``"REASON: details"``, :func:`rejection`); None if it is."""
    found = rejection(image, image_size)
    return None if found is None else str(found)

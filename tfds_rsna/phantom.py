"""Synthetic "phantom" hand radiographs in the official RSNA Bone Age release layout.

The phantoms carry the anatomy a bone-age reader looks at, so a model has to read the
skeleton to predict the label: radius and ulna, eight carpal bones, five metacarpals,
fourteen phalanges, a thumb sesamoid and a soft-tissue envelope, drawn with OpenCV
primitives on a dark noisy background with a collimation border and a burned-in
"L"/"R" marker.

Usage::

    python -m tfds_rsna.phantom --out DIR --num_train N --num_validation N --num_test N --seed S \
        [--height 640 --width 512 --num_workers 1 --overwrite]

    image, mask, keypoints = render_phantom(boneage, male, np.random.default_rng(0))
    render_phantom(120, True, rng, nuisance=Nuisance())   # neutral: upright, clean, no marker
    render_phantom(120, True, rng, rotation_deg=10.0)     # random nuisance, one field fixed
    write_dataset(out_dir, num_train, num_validation, num_test, seed)  # -> summary dict

Maturity
    ``m = clip(boneage * (1.15 if female else 1.0) / 228, 0, 1)`` (girls are about 15 %
    ahead at the same bone age).  All anatomy is driven by the male-equivalent age
    ``a = 228 * m`` months and is continuous in ``a``:

    * size: hand length grows from 0.42 (newborn) to 1.0 (adult) of an adult template
      (about 175 mm capitate-to-fingertip); bone widths grow as size**1.15, cortex
      thickens and bone density rises.  Framing partly compensates (the pixel scale goes
      as size**-0.75, like a technician who collimates to the hand), so with the pose
      fixed the hand still grows on the image (as size**0.25).
    * carpal ossification centres appear one by one (male-equivalent months: capitate 3,
      hamate 4, triquetrum 30, lunate 48, trapezium 66, trapezoid 70, scaphoid 72,
      pisiform 126), grow to full size by about 180 months and turn from round dots
      into larger, angular bones.
    * epiphyses of the phalanges (bases), metacarpals (heads of 2-5, base of the thumb),
      distal radius (from 14 months) and distal ulna (from 84 months) appear as dots,
      widen to the width of the metaphysis (about 7 years after onset), cap it (edges
      hook over the metaphysis) and fuse: the dark physeal line narrows and disappears,
      distal phalanges first (160-185), then middle, proximal, metacarpals and ulna, the
      radius last (190-222).
    * an adductor sesamoid at the thumb metacarpal head appears from 150 months.

Nuisance (see :class:`Nuisance`; its defaults are the neutral, noise-free pose)
    translation, rotation (normal, sd 9 deg, clipped to +-20), scale, left/right hand
    (15 % right hands, mirrored, "R" marker), finger spread, background level, contrast,
    gamma, heel-effect gradient, blur, pixel noise, collimation bands (bright or grey,
    0-3 sides) and the marker ("L"/"R", sometimes followed by initials, sometimes
    rotated).  Individual anatomy (body size, bone proportions, finger angles,
    soft-tissue thickness, bone density and mottle) also varies per image.

Mask
    255 where hand or forearm soft tissue is visible, 0 elsewhere; collimated bands and
    the marker box are cut out of it.

Keypoints (pixel ``(x, y)`` in the image; anatomical centres, present whether or not a
centre has ossified; they may fall outside the image for extreme poses)
    ``radius_distal``   centre of the distal end (epiphysis) of the radius
    ``ulna_distal``     centre of the distal end (head) of the ulna
    ``capitate``        centre of the capitate (centre of the carpus)
    ``hamate``, ``lunate``, ``scaphoid``, ``triquetrum``, ``trapezium``, ``trapezoid``,
    ``pisiform``        centres of the other carpal bones
    ``mcp1`` .. ``mcp5``  centres of the metacarpal heads (``mcp3``: 3rd metacarpal head)
    ``prox_phalanx_base1`` .. ``prox_phalanx_base5``  centres of the proximal phalanx
                        bases (the epiphysis region); the reference points of the
                        phalangeal ROI crops
    ``pip3_proximal``   base of the 3rd proximal phalanx (same point as
                        ``prox_phalanx_base3``)
    ``pip3``            proximal interphalangeal joint of the middle finger
    ``thumb_tip``, ``index_tip``, ``middle_tip``, ``ring_tip``, ``little_tip``
                        soft-tissue tips of the digits

Dataset layout written by :func:`write_dataset` (``python -m tfds_rsna.phantom``)::

    DIR/boneage-training-dataset.csv          id,boneage,male          (True/False)
    DIR/boneage-training-dataset/<id>.png
    DIR/Validation Dataset.csv                Image ID,male,Bone Age (months)  (TRUE/FALSE)
    DIR/boneage-validation-dataset-1/<id>.png  first half of the validation ids
    DIR/boneage-validation-dataset-2/<id>.png  second half
    DIR/Bone age ground truth.xlsx            Case ID, Sex (M/F), Ground truth bone age (months)
    DIR/boneage-test-dataset/<id>.png
    DIR/hand-masks/<id>.png                   uint8 soft-tissue mask, same size as the image
    DIR/keypoints.csv                         id,name,x,y

Ids are 1..N over train, then validation, then test.  Labels follow the RSNA training
distribution (normal, mean 127 months, sd 41, clipped to 1..228; integer months except
the test ground truth, a float with 2 decimals as in the official file; 54 % male).  Each image is
seeded from ``np.random.default_rng([seed, id])``, so the output is byte-identical for
the same arguments and independent of ``--num_workers``.

Speed, 512x640, one worker, ``cv2.setNumThreads(1)``, on a 2-core container shared with
other jobs (load average about 2.3, so an idle core is faster): ``render_phantom`` alone
37-56 images/s (40 typical; 40 images in a loop), and the whole writer, PNG encoding of
image and mask included, 25-34 images/s, measured with
``python -m tfds_rsna.phantom --out /tmp/ph --num_train 200 --num_validation 0 --num_test 0 --seed 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import math
import multiprocessing
import re
import shutil
import string
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import openpyxl

from boneage_jax.io import progress

TRAIN_CSV = "boneage-training-dataset.csv"
TRAIN_DIR = "boneage-training-dataset"
VALIDATION_CSV = "Validation Dataset.csv"
VALIDATION_DIRS = ("boneage-validation-dataset-1", "boneage-validation-dataset-2")
TEST_XLSX = "Bone age ground truth.xlsx"
TEST_DIR = "boneage-test-dataset"
MASK_DIR = "hand-masks"
KEYPOINTS_CSV = "keypoints.csv"
OUTPUT_ENTRIES = (TRAIN_CSV, TRAIN_DIR, VALIDATION_CSV, *VALIDATION_DIRS, TEST_XLSX, TEST_DIR,
                  MASK_DIR, KEYPOINTS_CSV)

MAX_BONEAGE = 228.0
FEMALE_ADVANCE = 1.15
LABEL_MEAN, LABEL_SD, MALE_FRACTION = 127.0, 41.0, 0.54

Point = tuple[float, float]


# ----------------------------------------------------------------------------- maturity

def maturity(boneage: float, male: bool) -> float:
    """Skeletal maturity in [0, 1]; girls are 15 % ahead at the same bone age."""
    return min(1.0, max(0.0, boneage * (1.0 if male else FEMALE_ADVANCE) / MAX_BONEAGE))


def _ramp(x: float, start: float, end: float) -> float:
    """Linear 0 -> 1 between start and end, clipped."""
    return min(1.0, max(0.0, (x - start) / (end - start)))


def _smoothstep(x: float, start: float, end: float) -> float:
    """Smooth 0 -> 1 between start and end, clipped."""
    t = _ramp(x, start, end)
    return t * t * (3.0 - 2.0 * t)


_SIZE_AGES = (0.0, 12.0, 36.0, 72.0, 120.0, 156.0, 192.0, 228.0)
_SIZE_VALUES = (0.42, 0.53, 0.64, 0.74, 0.84, 0.92, 0.985, 1.0)


def _growth(age: float) -> float:
    """Hand length relative to the adult template at male-equivalent age (months)."""
    return float(np.interp(age, _SIZE_AGES, _SIZE_VALUES))


# ----------------------------------------------------------------------------- labels

def sample_label(rng: np.random.Generator, integer: bool = True) -> tuple[float, bool]:
    """Draw (boneage months, male) like the RSNA training labels."""
    age = float(np.clip(rng.normal(LABEL_MEAN, LABEL_SD), 1.0, MAX_BONEAGE))
    male = bool(rng.random() < MALE_FRACTION)
    return (float(round(age)) if integer else round(age, 2)), male


# ----------------------------------------------------------------------------- nuisance

_INITIALS = string.ascii_uppercase.replace("L", "").replace("R", "")


@dataclasses.dataclass(frozen=True)
class Nuisance:
    """Pose and acquisition nuisance; the defaults give an upright, clean, unmarked image."""

    rotation_deg: float = 0.0  # counter-clockwise as displayed, about the capitate
    scale: float = 1.0  # zoom on top of the age-dependent framing
    shift_x: float = 0.0  # capitate offset, fraction of the width
    shift_y: float = 0.0  # capitate offset, fraction of the height
    mirror: bool = False  # True: right hand (thumb on the image left), "R" marker
    spread: float = 1.0  # finger abduction, 1 = typical
    background: float = 18.0  # grey level of the unattenuated background
    span: float = 235.0  # grey levels from background to full attenuation (contrast)
    gamma: float = 1.0
    gradient: float = 0.0  # heel-effect ramp amplitude in grey levels
    gradient_angle: float = 0.0  # radians
    blur_sigma: float = 0.0  # pixels, on top of a fixed 0.5 px anti-alias blur
    noise_sigma: float = 0.0  # grey levels
    # collimated bands: (side 0-3 = top/right/bottom/left, depth as a fraction, slant)
    collimation: tuple[tuple[int, float, float], ...] = ()
    collimation_level: float = 220.0
    marker: str = ""  # burned-in text, "" for none
    marker_size: float = 0.08  # box height as a fraction of the image height
    marker_rot90: int = 0
    marker_order: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # preference among the candidate places


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw a random nuisance setting (always the same number of draws)."""
    u = iter(rng.random(19).tolist())
    rotation = float(np.clip(rng.normal(0.0, 9.0), -20.0, 20.0))
    sides = rng.permutation(4)
    depths = rng.uniform(0.02, 0.12, 4)
    slants = rng.uniform(-0.04, 0.04, 4)
    initials = rng.integers(0, len(_INITIALS), 3)
    order = tuple(int(i) for i in rng.permutation(6))
    mirror = bool(next(u) < 0.15)
    num_sides = (0, 0, 0, 1, 1, 2, 3)[int(next(u) * 7)]
    num_initials = (0, 1, 2, 2, 3, 3)[int(next(u) * 6)]
    letters = "".join(_INITIALS[i] for i in initials[:num_initials])
    marker = (("R" if mirror else "L") + letters) if next(u) < 0.92 else ""
    bright_border = next(u) < 0.6
    return Nuisance(
        rotation_deg=rotation,
        scale=0.85 + 0.2 * next(u),
        shift_x=-0.06 + 0.12 * next(u),
        shift_y=-0.05 + 0.10 * next(u),
        mirror=mirror,
        spread=0.55 + 0.9 * next(u),
        background=5.0 + 40.0 * next(u),
        span=170.0 + 100.0 * next(u),
        gamma=math.exp(math.log(0.7) + math.log(2.0) * next(u)),
        gradient=-15.0 + 30.0 * next(u),
        gradient_angle=2.0 * math.pi * next(u),
        blur_sigma=0.2 + 1.2 * next(u),
        noise_sigma=1.5 + 5.5 * next(u),
        collimation=tuple((int(s), float(d), float(t)) for s, d, t in zip(sides[:num_sides], depths, slants)),
        collimation_level=(150.0 + 100.0 * next(u)) if bright_border else (60.0 + 60.0 * next(u)),
        marker=marker,
        marker_size=0.09 + 0.06 * next(u),
        marker_rot90=(0, 0, 0, 0, 0, 1, 3)[int(next(u) * 7)],
        marker_order=order,
    )


@dataclasses.dataclass(frozen=True)
class _Individual:
    """Per-person anatomy that is not age: body size, proportions, soft tissue, density."""

    size: float
    length_jitter: np.ndarray  # 19 tubular bones (5 metacarpals, 14 phalanges)
    angle_jitter: np.ndarray  # degrees, per digit
    tissue: float
    density: float


def _sample_individual(rng: np.random.Generator) -> _Individual:
    """Draw one person's anatomy (always the same number of draws)."""
    return _Individual(
        size=float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12)),
        length_jitter=np.clip(rng.normal(1.0, 0.03, 19), 0.92, 1.08),
        angle_jitter=rng.uniform(-3.0, 3.0, 5),
        tissue=float(rng.uniform(0.85, 1.25)),
        density=float(rng.uniform(0.9, 1.1)),
    )


# ----------------------------------------------------------------------------- anatomy template

@dataclasses.dataclass(frozen=True)
class _Epiphysis:
    """Secondary ossification centre at one end of a tubular bone (ages: male-equivalent months)."""

    at_base: bool  # True: proximal end (phalanges, thumb metacarpal); False: distal end
    onset: float
    close_start: float
    close_end: float
    reserve: float  # cartilaginous end region, in shaft widths
    dome: float  # superellipse exponent of the outline (2 round, 3 wafer)
    tilt: float = 0.0  # thicker towards +v (radial styloid) when positive


@dataclasses.dataclass(frozen=True)
class _Tubular:
    """Adult template of a tubular bone (mm)."""

    length: float
    width: float
    flare_base: float = 1.3
    flare_head: float = 1.2
    cap_base: float = 0.12  # end rounding, in widths
    cap_head: float = 0.3
    epiphysis: _Epiphysis | None = None


@dataclasses.dataclass(frozen=True)
class _Digit:
    base: Point  # metacarpal base, mm from the capitate centre (x radial, y distal)
    angle: float  # metacarpal direction, degrees from distal, positive radial
    spread_angle: float  # extra phalanx angle per unit of spread
    metacarpal: _Tubular
    phalanges: tuple[_Tubular, ...]


def _phalanx(length: float, width: float, row: str, thumb: bool = False) -> _Tubular:
    """A phalanx template with its basal epiphysis (row: proximal, middle or distal)."""
    onset = {"proximal": 18.0, "middle": 26.0, "distal": 20.0}[row] - (3.0 if thumb else 0.0)
    close = {"proximal": (170.0, 195.0), "middle": (168.0, 192.0), "distal": (160.0, 185.0)}[row]
    epi = _Epiphysis(True, onset, close[0], close[1], reserve=0.45, dome=2.8)
    if row == "distal":
        return _Tubular(length, width, flare_base=1.35, flare_head=1.3, cap_head=0.22, epiphysis=epi)
    return _Tubular(length, width, flare_base=1.35, flare_head=1.2, cap_head=0.3, epiphysis=epi)


def _metacarpal(length: float, width: float, thumb: bool = False) -> _Tubular:
    """A metacarpal template: epiphysis at the head, or at the base for the thumb."""
    if thumb:
        epi = _Epiphysis(True, 26.0, 168.0, 194.0, reserve=0.45, dome=2.8)
        return _Tubular(length, width, flare_base=1.3, flare_head=1.25, cap_head=0.42, epiphysis=epi)
    epi = _Epiphysis(False, 20.0, 172.0, 200.0, reserve=0.95, dome=2.0)
    return _Tubular(length, width, flare_base=1.3, flare_head=1.15, cap_base=0.12, epiphysis=epi)


_DIGITS = (
    _Digit((23.5, 8.0), 42.0, 6.0, _metacarpal(44.0, 10.0, thumb=True),
           (_phalanx(31.0, 9.5, "proximal", True), _phalanx(23.0, 8.0, "distal", True))),
    _Digit((11.0, 12.5), 10.0, 5.0, _metacarpal(66.0, 8.5),
           (_phalanx(40.0, 8.5, "proximal"), _phalanx(23.0, 7.0, "middle"), _phalanx(17.0, 6.0, "distal"))),
    _Digit((0.5, 13.5), 0.0, 0.0, _metacarpal(63.0, 8.7),
           (_phalanx(45.0, 9.0, "proximal"), _phalanx(28.0, 7.5, "middle"), _phalanx(19.0, 6.2, "distal"))),
    _Digit((-11.0, 12.0), -11.0, -5.0, _metacarpal(56.0, 7.8),
           (_phalanx(42.0, 8.5, "proximal"), _phalanx(27.0, 7.0, "middle"), _phalanx(19.0, 6.0, "distal"))),
    _Digit((-21.0, 9.0), -21.0, -10.0, _metacarpal(51.0, 7.5),
           (_phalanx(33.0, 7.5, "proximal"), _phalanx(19.0, 6.5, "middle"), _phalanx(17.0, 5.5, "distal"))),
)

_RADIUS = _Tubular(260.0, 14.0, flare_base=1.0, flare_head=1.85, cap_head=0.06,
                   epiphysis=_Epiphysis(False, 14.0, 190.0, 222.0, reserve=0.62, dome=3.0, tilt=0.55))
_RADIUS_END = (3.5, -24.5)  # centre of the distal radius end, mm
_ULNA = _Tubular(260.0, 9.0, flare_base=1.0, flare_head=1.45, cap_head=0.06,
                 epiphysis=_Epiphysis(False, 84.0, 185.0, 215.0, reserve=0.55, dome=2.4, tilt=-0.35))
_ULNA_END = (-17.0, -28.0)


@dataclasses.dataclass(frozen=True)
class _Carpal:
    name: str
    centre: Point
    half_axes: Point
    angle: float  # degrees, counter-clockwise in the hand frame
    onset: float  # male-equivalent months


_CARPALS = (
    _Carpal("capitate", (0.0, 0.0), (6.5, 11.0), 0.0, 3.0),
    _Carpal("hamate", (-13.5, 1.5), (5.5, 9.0), 0.0, 4.0),
    _Carpal("triquetrum", (-17.0, -14.0), (5.0, 5.5), 25.0, 30.0),
    _Carpal("lunate", (-4.5, -17.0), (6.5, 5.5), 0.0, 48.0),
    _Carpal("trapezium", (22.0, -0.5), (5.3, 6.5), -25.0, 66.0),
    _Carpal("trapezoid", (12.0, 5.5), (4.3, 5.8), -8.0, 70.0),
    _Carpal("scaphoid", (11.5, -14.0), (5.5, 10.0), -55.0, 72.0),
    _Carpal("pisiform", (-18.0, -16.5), (4.4, 5.0), 0.0, 126.0),
)
_CARPAL_FULL_AGE = 180.0
_CARPAL_WOBBLE = np.random.default_rng(20240611).uniform(-1.0, 1.0, (len(_CARPALS), 24))
_SESAMOID_ONSET = 150.0
_FINGER_NAMES = ("thumb", "index", "middle", "ring", "little")
_ADULT_TIP_MM = 175.0  # capitate centre to middle finger tip, adult template


# ----------------------------------------------------------------------------- drawing

class _Canvas:
    """Float bone layer and uint8 soft-tissue mask, addressed in hand-frame millimetres."""

    def __init__(self, height: int, width: int, affine: np.ndarray, px_per_mm: float):
        self.bone = np.zeros((height, width), np.float32)
        self.mask = np.zeros((height, width), np.uint8)
        self.affine = affine
        self.px_per_mm = px_per_mm

    def to_px(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.affine[:, :2].T + self.affine[:, 2]

    def frame(self, base: np.ndarray, d: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Bone-local frame (origin, u axis, v axis) in 1/8 pixels, for :meth:`fill_uv`."""
        linear = self.affine[:, :2] * 8.0
        return np.stack([linear @ base + 8.0 * self.affine[:, 2], linear @ d, linear @ n])

    def _fixed(self, pts: np.ndarray) -> np.ndarray:
        return np.round(self.to_px(pts) * 8.0).astype(np.int32)

    @staticmethod
    def _fixed_uv(frame: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.round(frame[0] + u[:, None] * frame[1] + v[:, None] * frame[2]).astype(np.int32)

    def fill(self, pts: np.ndarray, value: float, layer: str = "bone") -> None:
        target = self.bone if layer == "bone" else self.mask
        cv2.fillPoly(target, [self._fixed(pts)], float(value), cv2.LINE_8, 3)

    def fill_uv(self, frame: np.ndarray, u: np.ndarray, v: np.ndarray, value: float) -> None:
        cv2.fillPoly(self.bone, [self._fixed_uv(frame, u, v)], float(value), cv2.LINE_8, 3)

    def polyline_uv(self, frame: np.ndarray, u: np.ndarray, v: np.ndarray, value: float,
                    thickness_px: int) -> None:
        pts = self._fixed_uv(frame, u, v)
        cv2.polylines(self.bone, [pts], False, float(value), thickness_px, cv2.LINE_8, 3)

    def capsule(self, start: np.ndarray, end: np.ndarray, width_mm: float) -> None:
        """Round-capped thick segment in the mask."""
        thickness = max(1, int(round(width_mm * self.px_per_mm)))
        (x0, y0), (x1, y1) = self._fixed(np.stack([start, end])).tolist()
        cv2.line(self.mask, (x0, y0), (x1, y1), 255, thickness, cv2.LINE_8, 3)


def _unit(theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Direction (distal) and its radial-side normal for an angle from the hand's long axis."""
    return np.array([math.sin(theta), math.cos(theta)]), np.array([math.cos(theta), -math.sin(theta)])


_SIDE = np.linspace(0.0, 1.0, 12)
_SIN_CAP = np.sin(np.linspace(0.0, math.pi, 9))
_COS_CAP = np.cos(np.linspace(0.0, math.pi, 9))
_ACROSS = np.linspace(-1.0, 1.0, 17)
_ACROSS_ABS4 = np.abs(_ACROSS) ** 4


def _shaft_outline(s: np.ndarray, hw: np.ndarray, cap0: float, cap1: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) outline around side samples s (ascending) of half width hw, ends bulging by cap0/cap1."""
    u = np.concatenate([s, s[-1] + cap1 * _SIN_CAP, s[::-1], s[0] - cap0 * _SIN_CAP])
    v = np.concatenate([hw, hw[-1] * _COS_CAP, -hw[::-1], -hw[0] * _COS_CAP])
    return u, v


def _draw_tubular(cv: _Canvas, spec: _Tubular, base: np.ndarray, theta: float, length: float,
                  width: float, age: float, density: float) -> None:
    """Cortex, medulla and epiphysis of one tubular bone from base along theta."""
    frame = cv.frame(base, *_unit(theta))
    epi = spec.epiphysis
    reserve = epi.reserve * width if epi else 0.0
    u0 = reserve if epi and epi.at_base else 0.0
    u1 = length - reserve if epi and not epi.at_base else length
    cap0 = (0.06 if epi and epi.at_base else spec.cap_base) * width
    cap1 = (0.06 if epi and not epi.at_base else spec.cap_head) * width
    cortex = width * (0.13 + 0.12 * _ramp(age, 0.0, 200.0))
    end_cortex = 0.35 * cortex

    s = u0 + cap0 + (u1 - cap1 - u0 - cap0) * _SIDE
    zone = 1.6 * width
    near0 = np.clip(1.0 - (s - u0) / zone, 0.0, 1.0) ** 2
    near1 = np.clip(1.0 - (u1 - s) / zone, 0.0, 1.0) ** 2
    hw = 0.5 * width * (1.0 + (spec.flare_base - 1.0) * near0 + (spec.flare_head - 1.0) * near1)
    inner_hw = np.maximum(hw - cortex * (1.0 - 0.6 * (near0 + near1)), 0.12 * width)
    inner_cap0, inner_cap1 = max(cap0 - end_cortex, 0.02 * width), max(cap1 - end_cortex, 0.02 * width)
    inner_start, inner_end = u0 + end_cortex + inner_cap0, u1 - end_cortex - inner_cap1
    inner_s = inner_start + (inner_end - inner_start) * _SIDE
    cv.fill_uv(frame, *_shaft_outline(s, hw, cap0, cap1), density)
    cv.fill_uv(frame, *_shaft_outline(inner_s, inner_hw, inner_cap0, inner_cap1), 0.7 * density)
    if epi is not None and age > epi.onset:
        flare = spec.flare_base if epi.at_base else spec.flare_head
        _draw_epiphysis(cv, epi, frame, length, width * flare, reserve, age, density, end_cortex)


def _draw_epiphysis(cv: _Canvas, epi: _Epiphysis, frame: np.ndarray, length: float, metaphysis_width: float,
                    reserve: float, age: float, density: float, end_cortex: float) -> None:
    """Ossification centre: appears, widens to the metaphysis, caps it, fuses, and its scar fades."""
    grow = _ramp(age, epi.onset, epi.onset + 84.0)
    capping = _ramp(age, epi.close_start - 45.0, epi.close_start)
    closure = _smoothstep(age, epi.close_start, epi.close_end)
    remodel = _ramp(age, epi.close_end, epi.close_end + 18.0)
    gap = reserve * (0.45 - 0.25 * grow) * (1.0 - closure)
    half = 0.5 * metaphysis_width * (0.96 * grow ** 0.6 + 0.1 * capping)
    height = min((reserve - gap) * (0.4 + 0.6 * grow), 1.8 * half)
    if half * cv.px_per_mm < 0.3:
        return
    trabecular = 0.7 * density
    physis = length - reserve if not epi.at_base else reserve  # u of the metaphysis end
    sign = 1.0 if not epi.at_base else -1.0
    p = 2.0 + (epi.dome - 2.0) * grow
    dome = (1.0 - np.abs(_ACROSS) ** p) ** (1.0 / p) * (1.0 + epi.tilt * _ACROSS)
    droop = capping * 0.45 * _ACROSS_ABS4

    def outline(h: float, hw: float, lift: float) -> tuple[np.ndarray, np.ndarray]:
        top = physis + sign * (gap + lift + h * dome)
        bottom = physis + sign * (gap + lift - h * droop)
        return np.concatenate([top, bottom[::-1]]), np.concatenate([hw * _ACROSS, -hw * _ACROSS])

    gap_px = gap * cv.px_per_mm
    if gap_px > 0.05:
        line_value = 0.0 if gap_px >= 1.0 else trabecular * (1.0 - gap_px)
        cv.polyline_uv(frame, physis + sign * (0.5 * gap - height * droop), 1.05 * half * _ACROSS, line_value,
                       max(1, int(round(gap_px))))
    rim = min(end_cortex, 0.25 * half, 0.25 * height)
    cv.fill_uv(frame, *outline(height, half, 0.0), 0.95 * density)
    cv.fill_uv(frame, *outline(height - 2.0 * rim, half - rim, rim), trabecular)
    if remodel > 0.0:
        scar = (0.95 - 0.33 * remodel) * density
        cv.polyline_uv(frame, np.full(2, physis), np.array([rim - half, half - rim]), scar,
                       max(1, int(round(2.0 * end_cortex * cv.px_per_mm))))


def _superellipse(half_axes: Point, exponent: float, wobble: np.ndarray) -> np.ndarray:
    """Closed outline |x/a|^e + |y/b|^e = 1 (e=2 ellipse, larger = boxier), radii scaled by 1+wobble."""
    t = np.linspace(0.0, 2.0 * math.pi, wobble.size, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    x = half_axes[0] * np.sign(c) * np.abs(c) ** (2.0 / exponent)
    y = half_axes[1] * np.sign(s) * np.abs(s) ** (2.0 / exponent)
    return np.stack([x, y], axis=1) * (1.0 + wobble)[:, None]


def _rotate(pts: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate (N, 2) points counter-clockwise in the hand frame."""
    r = math.radians(degrees)
    return pts @ np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])


def _draw_carpals(cv: _Canvas, age: float, size: float, density: float) -> dict[str, np.ndarray]:
    """Ossified carpal bones; returns their anatomical centres (mm)."""
    centres = {}
    for carpal, wobble in zip(_CARPALS, _CARPAL_WOBBLE):
        centre = np.array(carpal.centre) * size
        centres[carpal.name] = centre
        if age <= carpal.onset:
            continue
        ossified = 0.3 * _ramp(age, carpal.onset, carpal.onset + 6.0) ** 0.5 \
            + 0.62 * _ramp(age, carpal.onset, _CARPAL_FULL_AGE) ** 0.8
        shape = _ramp(age, carpal.onset, carpal.onset + 110.0)
        mean_axis = 0.5 * (carpal.half_axes[0] + carpal.half_axes[1])
        axes = tuple((mean_axis + (a - mean_axis) * shape) * ossified * size for a in carpal.half_axes)
        if min(axes) * cv.px_per_mm < 0.4:
            continue
        exponent = 2.0 + 1.6 * shape
        outline = _rotate(_superellipse(axes, exponent, 0.1 * shape * wobble), carpal.angle)
        cortex = min(0.9, 0.3 * min(axes))
        inner_axes = (axes[0] - cortex, axes[1] - cortex)
        inner = _rotate(_superellipse(inner_axes, exponent, 0.1 * shape * wobble), carpal.angle)
        cv.fill(centre + outline, 0.92 * density)
        cv.fill(centre + inner, 0.74 * density)
    return centres


@dataclasses.dataclass(frozen=True)
class _Ray:
    """Where one digit lies (mm), for the palm outline: metacarpal and proximal-phalanx web point."""

    base: np.ndarray
    head: np.ndarray
    normal: np.ndarray  # radial-side normal of the metacarpal
    half_width: float  # metacarpal half width plus soft tissue
    web: np.ndarray  # centre of the proximal phalanx where the finger webs meet
    finger_normal: np.ndarray
    finger_half_width: float


def _draw_digit(cv: _Canvas, index: int, digit: _Digit, lengths: np.ndarray, angle_jitter: float,
                spread: float, age: float, size: float, density: float, margin: float,
                keypoints: dict[str, np.ndarray]) -> _Ray:
    """Metacarpal, phalanges and finger soft tissue of one digit (1 = thumb)."""
    wscale = size ** 1.15
    joint = 1.6 * size
    theta = math.radians(digit.angle + (14.0 * (spread - 1.0) if index == 1 else 0.0))
    base = np.array(digit.base) * size
    mc = digit.metacarpal
    length, width = mc.length * size * lengths[0], mc.width * wscale
    _draw_tubular(cv, mc, base, theta, length, width, age, density)
    d, n = _unit(theta)
    head = base + length * d
    keypoints[f"mcp{index}"] = head - (0.5 * mc.epiphysis.reserve * width if index > 1 else 0.3 * width) * d
    if index == 1 and age > _SESAMOID_ONSET:
        radius_mm = 2.4 * size * _ramp(age, _SESAMOID_ONSET, _SESAMOID_ONSET + 40.0) ** 0.5
        centre = head - 0.35 * width * n - 0.15 * width * d
        cv.fill(centre + _superellipse((radius_mm, radius_mm), 2.0, np.zeros(16)), 0.95 * density)
    ray = dict(base=base, head=head, normal=n, half_width=0.5 * width + margin)

    theta += math.radians(digit.spread_angle * spread + angle_jitter)
    d, n = _unit(theta)
    start = head + joint * d
    for row, phalanx in enumerate(digit.phalanges):
        length, width = phalanx.length * size * lengths[row + 1], phalanx.width * wscale
        _draw_tubular(cv, phalanx, start, theta, length, width, age, density)
        end = start + length * d
        last = row == len(digit.phalanges) - 1
        tissue_end = end - (0.5 * width + 0.5 * margin) * d if last else end
        cv.capsule(start - joint * d, tissue_end, width + 2.0 * margin)
        if row == 0:
            keypoints[f"prox_phalanx_base{index}"] = start + 0.5 * phalanx.epiphysis.reserve * width * d
            ray.update(web=start + 0.32 * length * d, finger_normal=n, finger_half_width=0.5 * width + margin)
            if index == 3:
                keypoints["pip3"] = end + 0.5 * joint * d
        start = end + joint * d
    keypoints[f"{_FINGER_NAMES[index - 1]}_tip"] = end + 0.5 * margin * d
    return _Ray(**ray)


def _draw_hand(cv: _Canvas, age: float, person: _Individual, spread: float) -> dict[str, np.ndarray]:
    """Soft tissue and skeleton of a left hand in the hand frame; returns keypoints (mm)."""
    size = _growth(age) * person.size
    density = person.density * (0.72 + 0.28 * _ramp(age, 0.0, 180.0))
    margin = 5.0 * size * person.tissue * (1.25 - 0.25 * _ramp(age, 0.0, 120.0))
    keypoints: dict[str, np.ndarray] = {}

    ends = {"radius": np.array(_RADIUS_END) * size, "ulna": np.array(_ULNA_END) * size}
    theta = math.radians(-2.0)
    d, _ = _unit(theta)
    for name, spec in (("radius", _RADIUS), ("ulna", _ULNA)):
        length, width = spec.length * size, spec.width * size ** 1.15
        _draw_tubular(cv, spec, ends[name] - length * d, theta, length, width, age, density)
        keypoints[f"{name}_distal"] = ends[name] - 0.5 * spec.epiphysis.reserve * width * d
    keypoints.update(_draw_carpals(cv, age, size, density))

    rays, offset = [], 0
    for index, digit in enumerate(_DIGITS, start=1):
        count = 1 + len(digit.phalanges)
        lengths = person.length_jitter[offset:offset + count]
        rays.append(_draw_digit(cv, index, digit, lengths, person.angle_jitter[index - 1], spread, age, size,
                                density, margin, keypoints))
        offset += count
    keypoints["pip3_proximal"] = keypoints["prox_phalanx_base3"]
    _draw_palm(cv, rays, ends["radius"], ends["ulna"], size, margin)
    return keypoints


def _draw_palm(cv: _Canvas, rays: list[_Ray], radius_end: np.ndarray, ulna_end: np.ndarray, size: float,
               margin: float) -> None:
    """Palm with finger webs, thenar eminence, wrist and forearm soft tissue."""
    thumb, index, middle, ring, little = rays
    thumb_web = 0.5 * (index.base + 0.55 * (index.head - index.base) + index.half_width * index.normal) \
        + 0.5 * (thumb.head - (thumb.half_width - 0.4 * margin) * thumb.normal)
    forearm = 320.0 * size
    wrist_ulnar = ulna_end + np.array([-(7.0 * size + margin), 0.0])
    wrist_radial = radius_end + np.array([15.0 * size + margin, 2.0 * size])
    outline = np.stack([
        wrist_ulnar + np.array([-0.08 * forearm, -forearm]),
        wrist_ulnar,
        little.base - little.half_width * little.normal,
        little.head - little.half_width * little.normal,
        little.web - little.finger_half_width * little.finger_normal,
        0.5 * (little.web + ring.web),
        0.5 * (ring.web + middle.web),
        0.5 * (middle.web + index.web),
        index.web + index.finger_half_width * index.finger_normal,
        index.head + index.half_width * index.normal,
        thumb_web,
        thumb.head - thumb.half_width * thumb.normal,
        thumb.head + thumb.half_width * thumb.normal,
        thumb.base + (thumb.half_width + 0.8 * margin) * thumb.normal,
        wrist_radial,
        wrist_radial + np.array([0.06 * forearm, -forearm]),
    ])
    cv.fill(outline, 255, layer="mask")
    cv.capsule(thumb.base, thumb.head, 2.0 * thumb.half_width)


# ----------------------------------------------------------------------------- image formation

def _pose(nuisance: Nuisance, size: float, height: int, width: int) -> tuple[np.ndarray, float]:
    """Affine map from hand-frame mm (x radial, y distal, origin at the capitate) to pixels."""
    px_per_mm = nuisance.scale * 0.64 * height / _ADULT_TIP_MM * size ** -0.75
    r = math.radians(nuisance.rotation_deg)
    rot = np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])
    flip = np.diag([-1.0 if nuisance.mirror else 1.0, -1.0])
    linear = px_per_mm * rot @ flip
    anchor = np.array([width * (0.5 + nuisance.shift_x), height * (0.71 + nuisance.shift_y)])
    return np.concatenate([linear, anchor[:, None]], axis=1), px_per_mm


def _soft_tissue(mask: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Soft-tissue thickness in [0, 1]: smooth edges, thicker in the forearm and palm."""
    h, w = mask.shape
    small = cv2.resize(mask, (w // 4, h // 4), interpolation=cv2.INTER_AREA).astype(np.float32)
    bulk = cv2.GaussianBlur(small, (0, 0), 1.5 * px_per_mm)  # 6 mm at quarter resolution
    bulk = cv2.resize(bulk, (w, h), interpolation=cv2.INTER_LINEAR)
    bulk *= 0.55 / 255.0 / 255.0
    bulk += 0.45 / 255.0
    edge = cv2.GaussianBlur(mask, (0, 0), max(0.5, 0.8 * px_per_mm)).astype(np.float32)
    return cv2.multiply(edge, bulk, dst=bulk)


def _expose(cv: _Canvas, setting: Nuisance, tissue: float, texture: np.ndarray,
            noise_bytes: bytes) -> np.ndarray:
    """Attenuation -> grey levels: bone texture, gamma, heel effect, border, marker, blur, noise.

    Works in place on a few full-size buffers (fresh large arrays cost page faults).
    """
    h, w = cv.bone.shape
    image = cv2.resize(texture, (w, h), interpolation=cv2.INTER_CUBIC)  # bone mottle, becomes the image
    image *= 0.08
    image += 0.38
    cv2.multiply(cv.bone, image, dst=image)
    cv2.scaleAdd(_soft_tissue(cv.mask, cv.px_per_mm), 0.38 * tissue ** 0.5, image, dst=image)
    image += 1e-6
    cv2.log(image, dst=image)  # gamma via log/exp: cv2.pow is slow for fractional powers
    image *= setting.gamma
    cv2.exp(image, dst=image)
    image *= setting.span
    heel_x = setting.gradient * math.cos(setting.gradient_angle)
    heel_y = setting.gradient * math.sin(setting.gradient_angle)
    across = (np.arange(w, dtype=np.float32) / w - 0.5) * heel_x
    down = (np.arange(h, dtype=np.float32) / h - 0.5) * heel_y
    image += across[None, :]
    image += (down + setting.background)[:, None]
    _collimate(image, cv.mask, setting)
    if setting.marker:
        _place_marker(image, cv.mask, setting)
    cv2.GaussianBlur(image, (0, 0), math.hypot(0.5, setting.blur_sigma), dst=image)
    pairs = np.frombuffer(noise_bytes, np.uint8).reshape(2, h, w)
    noise = cv2.add(pairs[0], pairs[1], dtype=cv2.CV_32F)  # triangular, mean 255, sd 104.4
    noise -= 255.0
    cv2.scaleAdd(noise, setting.noise_sigma / 104.4, image, dst=image)
    image += 0.5
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8)


def _collimate(image: np.ndarray, mask: np.ndarray, nuisance: Nuisance) -> None:
    """Overwrite collimated bands (and drop them from the mask)."""
    if not nuisance.collimation:
        return
    h, w = image.shape
    band = np.zeros((h, w), np.uint8)
    for side, depth, slant in nuisance.collimation:
        if side in (0, 2):
            near, far = (depth + slant) * h, (depth - slant) * h
            pts = [(0, 0), (w, 0), (w, far), (0, near)] if side == 0 else \
                [(0, h), (w, h), (w, h - far), (0, h - near)]
        else:
            near, far = (depth + slant) * w, (depth - slant) * w
            pts = [(0, 0), (near, 0), (far, h), (0, h)] if side == 3 else \
                [(w, 0), (w - near, 0), (w - far, h), (w, h)]
        cv2.fillConvexPoly(band, np.round(np.array(pts)).astype(np.int32), 255)
    image[band > 0] = nuisance.collimation_level
    mask[band > 0] = 0


def _marker_patch(text: str, box_height: int, rot90: int) -> np.ndarray:
    """White "L"/"R" (plus initials below it) on a dark rectangle."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    letter_scale = box_height / 40.0
    thick = max(2, int(round(box_height / 10.0)))
    (lw, lh), _ = cv2.getTextSize(text[0], font, letter_scale, thick)
    extra = text[1:]
    extra_scale = letter_scale * 0.45
    (ew, eh), _ = cv2.getTextSize(extra, font, extra_scale, max(1, thick // 2)) if extra else ((0, 0), 0)
    pad = max(2, box_height // 8)
    patch_w = max(lw, ew) + 2 * pad
    patch_h = lh + (eh + pad if extra else 0) + 2 * pad
    patch = np.full((patch_h, patch_w), 28, np.uint8)
    cv2.putText(patch, text[0], ((patch_w - lw) // 2, pad + lh), font, letter_scale, 245, thick, cv2.LINE_AA)
    if extra:
        cv2.putText(patch, extra, ((patch_w - ew) // 2, 2 * pad + lh + eh), font, extra_scale, 235,
                    max(1, thick // 2), cv2.LINE_AA)
    return np.ascontiguousarray(np.rot90(patch, rot90))


def _place_marker(image: np.ndarray, mask: np.ndarray, nuisance: Nuisance) -> None:
    """Paste the marker where it covers the least hand (dropped from the mask), in the drawn order."""
    h, w = image.shape
    patch = _marker_patch(nuisance.marker, max(12, int(nuisance.marker_size * h)), nuisance.marker_rot90)
    ph, pw = patch.shape
    if ph >= h or pw >= w:
        return
    m = max(2, h // 40)
    rows, cols = (m, h // 2, h - ph - m), (m, w - pw - m)
    places = [(y, x) for y in rows for x in cols]
    candidates = [places[i] for i in nuisance.marker_order]
    overlap = [int(np.count_nonzero(mask[y:y + ph, x:x + pw])) for y, x in candidates]
    y, x = candidates[int(np.argmin(overlap))]
    image[y:y + ph, x:x + pw] = patch
    mask[y:y + ph, x:x + pw] = 0


def render_phantom(boneage: float, male: bool, rng: np.random.Generator, height: int = 640,
                   width: int = 512, nuisance: Nuisance | None = None,
                   **overrides) -> tuple[np.ndarray, np.ndarray, dict[str, Point]]:
    """Render one phantom radiograph.

    Args:
      boneage: bone age in months (0-228).
      male: sex; girls are drawn 15 % more mature at the same bone age.
      rng: source of the individual anatomy, nuisance and noise.
      height, width: image size in pixels.
      nuisance: fixed pose/acquisition setting; None draws one from rng.  ``Nuisance()`` is
        the neutral setting (upright, centred, no noise, no border, no marker).
      **overrides: Nuisance fields to replace, e.g. ``rotation_deg=0.0``.

    Returns:
      (image uint8 HxW, mask uint8 HxW with 255 inside the soft tissue, keypoints name -> (x, y)).
    """
    person = _sample_individual(rng)
    sampled = sample_nuisance(rng)
    noise_bytes = rng.bytes(2 * height * width)
    texture = rng.random((height // 8 + 2, width // 8 + 2), dtype=np.float32)
    setting = dataclasses.replace(nuisance if nuisance is not None else sampled, **overrides)
    age = MAX_BONEAGE * maturity(boneage, male)
    affine, px_per_mm = _pose(setting, _growth(age) * person.size, height, width)
    canvas = _Canvas(height, width, affine, px_per_mm)
    keypoints_mm = _draw_hand(canvas, age, person, setting.spread)

    image = _expose(canvas, setting, person.tissue, texture, noise_bytes)
    names = sorted(keypoints_mm)
    pixels = canvas.to_px(np.stack([keypoints_mm[k] for k in names]))
    return image, canvas.mask, {k: (float(x), float(y)) for k, (x, y) in zip(names, pixels)}


# ----------------------------------------------------------------------------- dataset writing

@dataclasses.dataclass(frozen=True)
class _Task:
    image_id: int
    split: str
    image_path: Path
    mask_path: Path
    seed: int
    height: int
    width: int


class _Record(NamedTuple):
    image_id: int
    split: str
    boneage: float
    male: bool
    keypoints: dict[str, Point]


def _split_dirs(num_train: int, num_validation: int, num_test: int) -> list[tuple[int, str, str]]:
    """(id, split, image folder) for every image; ids run 1..N over train, validation, test."""
    rows = [(i, "train", TRAIN_DIR) for i in range(1, num_train + 1)]
    first_half = (num_validation + 1) // 2
    for k in range(num_validation):
        rows.append((num_train + k + 1, "validation", VALIDATION_DIRS[0 if k < first_half else 1]))
    start = num_train + num_validation
    rows += [(start + k + 1, "test", TEST_DIR) for k in range(num_test)]
    return rows


def _render_task(task: _Task) -> _Record:
    """Render and write one image and its mask, seeded by (seed, id)."""
    rng = np.random.default_rng([task.seed, task.image_id])
    boneage, male = sample_label(rng, integer=task.split != "test")
    image, mask, keypoints = render_phantom(boneage, male, rng, task.height, task.width)
    for path, array in ((task.image_path, image), (task.mask_path, mask)):
        if not cv2.imwrite(str(path), array):
            raise OSError(f"could not write {path}")
    return _Record(task.image_id, task.split, boneage, male, keypoints)


def _init_worker() -> None:
    cv2.setNumThreads(1)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


_FIXED_STAMP = b"2017-07-28T00:00:00Z"
_DATE_ELEMENT = re.compile(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*")


def _write_xlsx(path: Path, rows: Sequence[tuple[int, str, float]]) -> None:
    """Test ground truth as one sheet; zip entries and document dates fixed for reproducibility."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.title = "Sheet1"
    sheet.append(["Case ID", "Sex", "Ground truth bone age (months)"])
    for row in rows:
        sheet.append(list(row))
    buffer = io.BytesIO()
    workbook.save(buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = _DATE_ELEMENT.sub(rb"\g<1>" + _FIXED_STAMP, data)
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), data,
                         compress_type=zipfile.ZIP_DEFLATED)


def _validate(num_train: int, num_validation: int, num_test: int, height: int, width: int,
              num_workers: int) -> None:
    counts = {"num_train": num_train, "num_validation": num_validation, "num_test": num_test}
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value}")
    if sum(counts.values()) == 0:
        raise ValueError("nothing to write: all split sizes are 0")
    if height < 64 or width < 64:
        raise ValueError(f"image size must be at least 64x64, got {height}x{width}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")


def write_dataset(out_dir: str | Path, num_train: int, num_validation: int, num_test: int, seed: int,
                  height: int = 640, width: int = 512, num_workers: int = 1, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Write a phantom dataset in the RSNA release layout and return a summary.

    Arguments are validated first.  Images are rendered into a staging folder next to
    ``out_dir`` and moved into place at the end.  A non-empty ``out_dir`` is refused
    (FileExistsError) unless ``overwrite``; then only the entries this writer produces are
    replaced and other files are left alone.  Progress shows as a bar when stderr is a terminal;
    otherwise ``log`` receives a line about every 10 %.
    """
    _validate(num_train, num_validation, num_test, height, width, num_workers)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace the phantom dataset in it")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.partial-", dir=parent))
    try:
        rows = _split_dirs(num_train, num_validation, num_test)
        tasks = [_Task(i, split, staging / folder / f"{i}.png", staging / MASK_DIR / f"{i}.png", seed,
                       height, width) for i, split, folder in rows]
        for folder in (TRAIN_DIR, *VALIDATION_DIRS, TEST_DIR, MASK_DIR):
            (staging / folder).mkdir()
        records = _render_all(tasks, num_workers, log)
        _write_labels(staging, records)
        out.mkdir(exist_ok=True)
        for entry in OUTPUT_ENTRIES:
            target = out / entry
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            (staging / entry).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ages = np.array([r.boneage for r in records])
    return {
        "out_dir": str(out),
        "num_train": num_train,
        "num_validation": num_validation,
        "num_test": num_test,
        "seed": seed,
        "height": height,
        "width": width,
        "boneage_mean": float(ages.mean()),
        "boneage_sd": float(ages.std()),
        "male_fraction": float(np.mean([r.male for r in records])),
    }


def _render_all(tasks: list[_Task], num_workers: int, log: Callable[[str], None]) -> list[_Record]:
    """Render every task in id order: a progress bar on a terminal, else ``log`` gets a line
    about every 10 %."""
    with _ordered_map(num_workers) as imap:
        return list(progress(imap(_render_task, tasks), total=len(tasks), desc="phantom", log=log))


@contextlib.contextmanager
def _ordered_map(num_workers: int) -> Iterator[Callable]:
    """Yield an ordered map: the builtin for one worker, a process pool's imap otherwise."""
    if num_workers == 1:
        yield map
        return
    with multiprocessing.get_context("spawn").Pool(num_workers, initializer=_init_worker) as pool:
        yield lambda fn, items: pool.imap(fn, items, chunksize=4)


def _write_labels(staging: Path, records: list[_Record]) -> None:
    """The three label files in their official formats, and keypoints.csv."""
    def split(name: str) -> list[_Record]:
        return [r for r in records if r.split == name]

    _write_csv(staging / TRAIN_CSV, ("id", "boneage", "male"),
               [(r.image_id, int(r.boneage), str(r.male)) for r in split("train")])
    _write_csv(staging / VALIDATION_CSV, ("Image ID", "male", "Bone Age (months)"),
               [(r.image_id, str(r.male).upper(), int(r.boneage)) for r in split("validation")])
    _write_xlsx(staging / TEST_XLSX,
                [(r.image_id, "M" if r.male else "F", float(r.boneage)) for r in split("test")])
    _write_csv(staging / KEYPOINTS_CSV, ("id", "name", "x", "y"),
               [(r.image_id, name, f"{x:.1f}", f"{y:.1f}")
                for r in records for name, (x, y) in r.keypoints.items()])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tfds_rsna.phantom", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    parser.add_argument("--num_train", type=int, required=True)
    parser.add_argument("--num_validation", type=int, required=True)
    parser.add_argument("--num_test", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the phantom files in a non-empty --out")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    try:
        summary = write_dataset(args.out, args.num_train, args.num_validation, args.num_test, args.seed,
                                args.height, args.width, args.num_workers, args.overwrite)
    except (ValueError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Deterministic synthetic image-classification dataset (the project's embedded default).

Why this exists
---------------
The trainer, the pruning code and the FFCV pipeline all need *some* image data to run
end to end, in CI and on machines without ImageNet.  Random noise is useless for that:
a model cannot learn it, so accuracy-after-pruning numbers mean nothing.  This module
generates images that have real, learnable, class-dependent structure, cheaply and
deterministically, so a small ResNet trained for minutes on a CPU gets well above chance
and pruning visibly moves accuracy.

Design
------
* **Class = combination of three attributes**: a *shape* (disc, square, triangle, ring,
  cross, star, crescent, bar), a *texture* painted on the shape (smooth, dots, stripes,
  checker) and a *colour family* (red, yellow, green, blue).  The mapping class index ->
  attributes is a fixed formula (:func:`class_attributes`), so it is identical in every
  process and for every seed, and every ``num_classes`` from 2 up to
  :data:`MAX_CLASSES` (8 * 4 * 4 = 128) gets distinct attribute triples.
* **Colour alone is ambiguous on purpose**: there are only four colour families, and the
  formula makes classes that share a family differ in shape and texture (e.g. with 10
  classes, four of them are yellow; with 2 classes both are red).  A classifier must
  therefore look at shape/texture, which is what makes pruning damage measurable.
* **Per-image nuisance** so the task is not a lookup table: random position, scale and
  rotation of the shape, random texture phase/orientation/period, hue/saturation/value
  jitter, a random low-saturation background gradient, an optional small distractor
  blob of arbitrary colour, and mild Gaussian pixel noise.
* **Item i depends only on (seed, i)**: each item uses ``np.random.default_rng([seed, i])``.
  An FFCV writer calls ``__getitem__`` from several worker processes in arbitrary order;
  any subset can be generated independently and gives byte-identical results.  Train and
  validation splits are simply two instances with different seeds.
* **Fast and pure numpy**: shapes are drawn as approximate signed-distance functions
  evaluated on a coordinate grid (no per-pixel Python loops), which also gives cheap
  anti-aliasing (coverage = clip(0.5 - distance / pixel_size, 0, 1)).  Geometry is in
  normalised coordinates ([-1, 1] across the image), so the same image content is produced
  at any ``image_size``; texture periods are chosen so patterns stay resolvable at 32 px.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

__all__ = [
    "SyntheticImages",
    "SHAPES",
    "TEXTURES",
    "COLOUR_FAMILIES",
    "MAX_CLASSES",
    "class_attributes",
]

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "star", "crescent", "bar")
TEXTURES: tuple[str, ...] = ("smooth", "dots", "stripes", "checker")
# Hue centre (in [0, 1)) of each colour family.  Only four families, so that colour is
# shared between classes and cannot identify a class by itself.
COLOUR_FAMILIES: dict[str, float] = {"red": 0.0, "yellow": 0.14, "green": 0.33, "blue": 0.61}
_FAMILY_NAMES = tuple(COLOUR_FAMILIES)
_FAMILY_HUES = tuple(COLOUR_FAMILIES.values())

MAX_CLASSES = len(SHAPES) * len(TEXTURES) * len(COLOUR_FAMILIES)

# Smallest sensible resolution: below this the textures (period ~4 px at 32 px) and the
# shape outlines stop being distinguishable.
MIN_IMAGE_SIZE = 16


def class_attributes(c: int) -> tuple[int, int, int]:
    """Return ``(shape, texture, colour)`` indices for class ``c``.

    Shapes cycle fastest so the first 8 classes all have different shapes; texture and
    colour are offset so that, for small class counts, classes sharing a colour family
    differ in both shape and texture.  The formula is a bijection onto all
    8 * 4 * 4 triples for ``0 <= c < MAX_CLASSES`` (checked at import time below).
    """
    n_s, n_t, n_c = len(SHAPES), len(TEXTURES), len(COLOUR_FAMILIES)
    k = c // n_s
    shape = c % n_s
    texture = (c + k) % n_t
    colour = (c // 2 + k + c // (n_s * n_t)) % n_c
    return shape, texture, colour


# Import-time guard: if someone edits the attribute lists or the formula, fail loudly
# rather than silently producing two classes with identical definitions.
assert len({class_attributes(c) for c in range(MAX_CLASSES)}) == MAX_CLASSES


def _class_name(c: int) -> str:
    s, t, col = class_attributes(c)
    return f"{_FAMILY_NAMES[col]}-{SHAPES[s]}-{TEXTURES[t]}"


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Shape signed distances.  (u, v) are shape-local coordinates (already translated,
# rotated and divided by the shape radius R), so every function describes a shape of
# "radius" ~1; the caller multiplies the result by R to get distances in image units.
# Negative = inside.  Several are not exact Euclidean SDFs outside the shape (box corners,
# star), which only affects the 1-px anti-aliasing band, not the silhouette.
# ---------------------------------------------------------------------------------------


def _box(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    return np.maximum(np.abs(u) - hu, np.abs(v) - hv)


def _sdf(shape: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    if shape == "disc":
        return r - 0.9
    if shape == "square":
        return _box(u, v, 0.78, 0.78)
    if shape == "triangle":
        # Equilateral triangle with circumradius 1.1: intersection of three half-planes
        # whose outward normals point at 90, 210 and 330 degrees.
        d = None
        for ang in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            h = u * math.cos(ang) + v * math.sin(ang) - 0.55
            d = h if d is None else np.maximum(d, h)
        return d
    if shape == "ring":
        # Annulus of mean radius 0.7 and half-thickness 0.28: the hole is what separates
        # it from "disc" at the same colour.
        return np.abs(r - 0.7) - 0.28
    if shape == "cross":
        return np.minimum(_box(u, v, 0.95, 0.3), _box(u, v, 0.3, 0.95))
    if shape == "star":
        # Five-pointed star in polar form: radius oscillates between 0.45 (valleys) and
        # 1.0 (tips) linearly in angle.
        theta = np.arctan2(v, u)
        frac = theta * (5 / (2 * math.pi))
        frac -= np.floor(frac)  # x - floor(x) instead of x % 1.0: numpy's float mod is ~10x slower
        tip = np.abs(frac - 0.5) * 2.0  # 1 at tips, 0 at valleys
        return r - (0.42 + 0.58 * tip)
    if shape == "crescent":
        # Disc minus an offset, slightly smaller disc.
        r2 = np.sqrt((u - 0.45) ** 2 + v**2)
        return np.maximum(r - 0.95, 0.75 - r2)
    if shape == "bar":
        return _box(u, v, 1.0, 0.32)
    raise AssertionError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Return a pattern mask in [0, 1] (1 = secondary colour) or None for smooth.

    (u, v) are in image units (not divided by R) so the texture period is a fixed
    fraction of the image, i.e. a fixed number of pixels per period at a given
    image_size; periods are >= ~3.5 px at 32 px so they survive downsampling.
    The pattern gets its own random orientation and phase: texture orientation must not
    be a class cue, only the pattern type.
    """
    if texture == "smooth":
        return None
    ang = rng.uniform(0, math.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    a = u * ca + v * sa
    b = -u * sa + v * ca
    ph_a, ph_b = (float(p) for p in rng.uniform(0, 1, size=2))
    if texture == "dots":
        period = rng.uniform(0.24, 0.32)
        fa = a / period + ph_a
        fb = b / period + ph_b
        # Fractional part minus 0.5 = offset from the nearest dot centre (x - floor(x)
        # rather than x % 1.0, which is ~10x slower in numpy).
        fa = fa - np.floor(fa) - 0.5
        fb = fb - np.floor(fb) - 0.5
        d = np.sqrt(fa * fa + fb * fb)  # distance to nearest dot centre, in periods
        # Soft dot of radius 0.28 periods; the 0.08 ramp anti-aliases the edge.
        return np.clip((0.28 - d) / 0.08 + 0.5, 0.0, 1.0)
    if texture == "stripes":
        period = rng.uniform(0.24, 0.32)
        # Clipped, steep sinusoid = square wave with soft edges.
        return np.clip(0.5 + 2.5 * np.sin(2 * math.pi * (a / period + ph_a)), 0.0, 1.0)
    if texture == "checker":
        period = rng.uniform(0.36, 0.46)  # a checker cell is half a period: keep it >= 3 px at 32 px
        s = np.sin(2 * math.pi * (a / period + ph_a)) * np.sin(2 * math.pi * (b / period + ph_b))
        return np.clip(0.5 + 6.0 * s, 0.0, 1.0)
    raise AssertionError(f"unknown texture {texture!r}")


class SyntheticImages:
    """Indexable dataset of generated RGB images.

    Item i depends only on (seed, i), so any subset can be generated independently and
    in parallel (an FFCV writer calls __getitem__ from several worker processes).

    ``ds[i]`` returns ``(image, label)``: ``image`` is an ``image_size x image_size x 3``
    C-contiguous ``uint8`` array, ``label`` an ``int`` in ``[0, num_classes)``.  Labels are
    ``i % num_classes``, so classes are balanced to within one image.  ``classes`` holds
    human-readable names such as ``"red-disc-smooth"``.
    """

    def __init__(self, num_images: int, image_size: int = 64, num_classes: int = 10, seed: int = 0):
        # bool is an int subclass; reject it (and floats) explicitly so typos in configs fail early.
        for name, val in (("num_images", num_images), ("image_size", image_size),
                          ("num_classes", num_classes), ("seed", seed)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                raise ValueError(f"{name} must be an int, got {val!r} ({type(val).__name__})")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
        if not 2 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
        if seed < 0:
            # np.random.default_rng rejects negative entropy; say so up front.
            raise ValueError(f"seed must be >= 0, got {seed}")

        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.classes: list[str] = [_class_name(c) for c in range(self.num_classes)]

        # Pixel-centre coordinate grid in [-1, 1], shared by all items (read-only, so it is
        # safe to share across forked workers).  y grows downwards, x to the right.
        n = self.image_size
        coords = (np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0
        # Materialised (not broadcast views): contiguous arrays make every later ufunc faster.
        self._x = np.ascontiguousarray(np.broadcast_to(coords[None, :], (n, n)))
        self._y = np.ascontiguousarray(np.broadcast_to(coords[:, None], (n, n)))
        self._px = 2.0 / n  # size of one pixel in normalised units, for anti-aliasing

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (f"SyntheticImages(num_images={self.num_images}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, seed={self.seed})")

    def label(self, i: int) -> int:
        """Label of item i without rendering it (cheap; useful for samplers)."""
        return self._check_index(i) % self.num_classes

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += self.num_images  # support negative indexing like a sequence
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for dataset of length {self.num_images}")
        return i

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        i = self._check_index(i)
        label = i % self.num_classes
        # Seeding on (seed, i) - not a shared stream - is what makes items independent of
        # generation order and of which worker renders them.
        rng = np.random.default_rng([self.seed, i])
        img = self._render(label, rng)
        return img, label

    # -----------------------------------------------------------------------------------

    def _render(self, label: int, rng: np.random.Generator) -> np.ndarray:
        x, y, px = self._x, self._y, self._px
        shape_i, tex_i, col_i = class_attributes(label)

        # Background: linear gradient between two low-saturation colours along a random
        # direction.  Low saturation keeps the (saturated) shape visible whatever its
        # family, and the random tint/brightness stops the background from carrying class
        # information while still perturbing the image's mean colour.
        c0 = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.95))
        c1 = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.95))
        phi = rng.uniform(0, 2 * math.pi)
        t = np.clip(0.5 + 0.5 * (x * math.cos(phi) + y * math.sin(phi)), 0.0, 1.0)[..., None]
        img = c0 + (c1 - c0) * t  # (n, n, 3) float32

        # Optional distractor blob, drawn *behind* the main shape, in any hue: adds clutter
        # and further decorrelates mean colour from the label.
        if rng.uniform() < 0.5:
            br = rng.uniform(0.08, 0.16)
            bx, by = (float(c) for c in rng.uniform(-0.9, 0.9, size=2))
            bd = np.sqrt((x - bx) ** 2 + (y - by) ** 2) - br
            ba = np.clip(0.5 - bd / px, 0.0, 1.0)[..., None]
            bcol = _hsv(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
            img = img + (bcol - img) * ba

        # Main shape: random radius, centre (kept mostly inside the frame), rotation.
        R = rng.uniform(0.42, 0.66)
        lim = max(0.0, 0.95 - R)
        # float(): numpy float64 *scalars* would promote the float32 grids to float64 (NEP 50).
        cx, cy = (float(c) for c in rng.uniform(-lim, lim, size=2))
        rot = rng.uniform(0, 2 * math.pi)
        cr, sr = math.cos(rot), math.sin(rot)
        dx, dy = x - cx, y - cy
        u = (dx * cr + dy * sr) / R
        v = (-dx * sr + dy * cr) / R
        r = np.sqrt(u * u + v * v)
        d = _sdf(SHAPES[shape_i], u, v, r) * R  # back to image units
        alpha = np.clip(0.5 - d / px, 0.0, 1.0)[..., None]

        # Shape colour: family hue with jitter, saturated and fairly bright.  Texture colour
        # is a darker shade of the same hue so texture is a luminance pattern, not a new
        # colour cue.
        hue = _FAMILY_HUES[col_i] + rng.uniform(-0.035, 0.035)
        fg = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
        pattern = _texture(TEXTURES[tex_i], dx, dy, rng)
        if pattern is None:
            fill = np.broadcast_to(fg, img.shape)
        else:
            shade = fg * rng.uniform(0.2, 0.45)
            fill = fg + (shade - fg) * pattern[..., None]
        img = img + (fill - img) * alpha

        # Mild sensor noise.  Uniform rather than Gaussian: float32 uniform draws are ~4x
        # cheaper and the distribution of the noise does not matter here.
        amp = rng.uniform(0.04, 0.12)  # noise std = amp / sqrt(12), i.e. ~1-3.5% of full range
        img = img + (rng.random(img.shape, dtype=np.float32) - 0.5) * amp
        out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out)

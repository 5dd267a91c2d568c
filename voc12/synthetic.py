"""Synthetic PASCAL-VOC-format data set: the embedded default that the demo and the tests train on.

Each class has its own shape family (with a distinctive "accent" part, so a CAM tends to fire on
that part and under-cover the body), colour distribution and texture. Images hold 1-3 objects at
varied scales, rotations and aspect ratios, overlapping and truncated at the border, over a
cluttered background whose colours and textures are drawn independently of the classes present.
Classes co-occur as in VOC (person with tvmonitor, cat with dog, ...), so an image-level label
does not say where an object is.

    python -m voc12.synthetic --out DIR --num_train N --num_val M --seed S [--classes a,b,...]

writes JPEGImages/, Annotations/ (VOC XML with boxes), SegmentationClass/ (VOC palette PNGs with a
255 band along object borders), ImageSets/Segmentation/{train,val,train_aug}.txt and
cls_labels.npy. Output is a pure function of the options.
"""

from __future__ import annotations

import argparse
import colorsys
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from voc12.lists import (
    ANNOTATION_DIR, CLASS_INDEX, CLASS_NAMES, IGNORE_LABEL, IMAGE_DIR, MASK_DIR, NUM_CLASSES, PathLike,
    default_cls_labels_path, default_list_path, save_cls_labels, write_id_list, write_palette_mask,
)

DEFAULT_CLASSES: tuple[str, ...] = ("aeroplane", "bird", "cat", "dog", "person", "tvmonitor")

# Primitive = (kind, role, geometry) in a unit frame (object half-size 1, y down).
# kinds: "poly" (points), "ellipse" (cx, cy, rx, ry), "line" (points, thickness); roles: body/accent.
Primitive = tuple[str, str, tuple]


def _rect(cx: float, cy: float, w: float, h: float) -> tuple:
    return ((cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2))


def _star(cx: float, cy: float, outer: float, inner: float, spikes: int) -> tuple:
    angles = np.arange(2 * spikes) * np.pi / spikes
    radii = np.where(np.arange(2 * spikes) % 2 == 0, outer, inner)
    return tuple(zip(cx + radii * np.sin(angles), cy - radii * np.cos(angles)))


def _crescent(outer: float, inner: float, shift: float) -> tuple:
    # outer circle arc, then the inner (shifted) circle's arc back: a moon shape.
    t = np.linspace(-0.8 * np.pi, 0.8 * np.pi, 24)
    outer_arc = list(zip(outer * np.cos(t), outer * np.sin(t)))
    inner_arc = list(zip(shift + inner * np.cos(t[::-1]), inner * np.sin(t[::-1])))
    return tuple(outer_arc + inner_arc)


SHAPES: dict[str, list[Primitive]] = {
    "aeroplane": [("poly", "body", _rect(0, 0, 1.9, 0.3)),
                  ("poly", "body", ((-0.25, -0.95), (0.1, -0.95), (0.35, 0), (0.1, 0.95), (-0.25, 0.95), (-0.05, 0))),
                  ("poly", "accent", ((-0.95, -0.55), (-0.72, -0.55), (-0.55, 0), (-0.95, 0)))],
    "bicycle": [("line", "body", (((-0.55, 0.3), (0, -0.35), (0.55, 0.3)), 0.12)),
                ("line", "body", (tuple((-0.55 + 0.42 * np.cos(a), 0.3 + 0.42 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 25)), 0.12)),
                ("line", "body", (tuple((0.55 + 0.42 * np.cos(a), 0.3 + 0.42 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 25)), 0.12)),
                ("poly", "accent", _rect(0, -0.45, 0.4, 0.14))],
    "bird": [("ellipse", "body", (0, 0, 0.7, 0.4)),
             ("poly", "body", ((-0.3, -0.1), (0.2, -0.1), (-0.5, -0.75))),
             ("poly", "accent", ((0.62, -0.16), (1.0, 0.0), (0.62, 0.13)))],
    "boat": [("poly", "body", ((-1, 0.2), (1, 0.2), (0.7, 0.65), (-0.7, 0.65))),
             ("poly", "body", _rect(0, -0.35, 0.08, 1.1)),
             ("poly", "accent", ((0.06, -0.9), (0.65, 0.12), (0.06, 0.12)))],
    "bottle": [("poly", "body", _rect(0, 0.25, 0.5, 1.3)), ("poly", "body", _rect(0, -0.6, 0.22, 0.5)),
               ("poly", "accent", _rect(0, 0.3, 0.5, 0.4))],
    "bus": [("poly", "body", _rect(0, 0, 1.9, 1.0)), ("poly", "accent", _rect(0, -0.2, 1.7, 0.3))],
    "car": [("poly", "body", _rect(0, 0.15, 1.9, 0.5)),
            ("poly", "body", ((-0.5, -0.1), (0.5, -0.1), (0.3, -0.5), (-0.35, -0.5))),
            ("ellipse", "accent", (-0.55, 0.45, 0.22, 0.22)), ("ellipse", "accent", (0.55, 0.45, 0.22, 0.22))],
    "cat": [("ellipse", "body", (0, 0.1, 0.7, 0.65)),
            ("poly", "accent", ((-0.68, -0.15), (-0.58, -0.95), (-0.15, -0.5))),
            ("poly", "accent", ((0.68, -0.15), (0.58, -0.95), (0.15, -0.5)))],
    "chair": [("poly", "body", _rect(0, 0.1, 1.0, 0.2)), ("poly", "body", _rect(-0.42, -0.45, 0.16, 1.0)),
              ("poly", "body", _rect(-0.42, 0.55, 0.12, 0.8)), ("poly", "body", _rect(0.42, 0.55, 0.12, 0.8)),
              ("poly", "accent", _rect(-0.1, -0.03, 0.75, 0.12))],
    "cow": [("ellipse", "body", (0, 0, 0.85, 0.5)), ("poly", "body", _rect(-0.55, 0.55, 0.14, 0.6)),
            ("poly", "body", _rect(0.5, 0.55, 0.14, 0.6)), ("ellipse", "accent", (0.92, -0.35, 0.3, 0.22))],
    "diningtable": [("poly", "body", _rect(0, -0.3, 2.0, 0.25)), ("poly", "body", _rect(-0.8, 0.3, 0.12, 1.0)),
                    ("poly", "body", _rect(0.8, 0.3, 0.12, 1.0)), ("ellipse", "accent", (0, -0.45, 0.3, 0.1))],
    "dog": [("ellipse", "body", (-0.1, 0.15, 0.75, 0.42)), ("line", "body", (((-0.8, 0.1), (-1.0, -0.45)), 0.12)),
            ("ellipse", "accent", (0.65, -0.35, 0.35, 0.3)), ("poly", "accent", ((0.45, -0.5), (0.3, 0.0), (0.6, -0.2)))],
    "horse": [("poly", "body", _crescent(0.9, 0.7, 0.45)),
              ("line", "accent", (tuple((0.9 * np.cos(a), 0.9 * np.sin(a)) for a in np.linspace(-0.75 * np.pi, -0.3 * np.pi, 10)), 0.18))],
    "motorbike": [("ellipse", "body", (-0.6, 0.45, 0.35, 0.35)), ("ellipse", "body", (0.6, 0.45, 0.35, 0.35)),
                  ("line", "body", (((-0.6, 0.4), (0, -0.2), (0.6, 0.4)), 0.15)),
                  ("ellipse", "accent", (0, -0.25, 0.38, 0.18))],
    "person": [("poly", "body", _rect(0, 0.05, 0.62, 0.8)), ("poly", "body", _rect(-0.17, 0.7, 0.2, 0.6)),
               ("poly", "body", _rect(0.17, 0.7, 0.2, 0.6)), ("ellipse", "accent", (0, -0.62, 0.27, 0.3))],
    "pottedplant": [("poly", "body", ((-0.4, 0.3), (0.4, 0.3), (0.3, 0.95), (-0.3, 0.95))),
                    ("poly", "accent", _star(0, -0.25, 0.7, 0.3, 7))],
    "sheep": [("ellipse", "body", (-0.4, 0, 0.4, 0.4)), ("ellipse", "body", (0, -0.2, 0.45, 0.4)),
              ("ellipse", "body", (0.35, 0, 0.4, 0.4)), ("ellipse", "body", (0, 0.2, 0.45, 0.35)),
              ("ellipse", "accent", (0.8, -0.1, 0.22, 0.18))],
    "sofa": [("poly", "body", _rect(0, 0.3, 2.0, 0.5)), ("poly", "body", _rect(-0.9, 0, 0.25, 0.9)),
             ("poly", "body", _rect(0.9, 0, 0.25, 0.9)), ("poly", "body", _rect(0, -0.25, 2.0, 0.35)),
             ("poly", "accent", _rect(-0.4, 0.05, 0.6, 0.2)), ("poly", "accent", _rect(0.4, 0.05, 0.6, 0.2))],
    "train": [("poly", "body", _rect(-0.7, 0, 0.6, 0.7)), ("poly", "body", _rect(0, 0, 0.6, 0.7)),
              ("poly", "body", _rect(0.7, 0, 0.6, 0.7)), ("poly", "body", _rect(0, 0.1, 2.0, 0.15)),
              ("poly", "accent", ((1.0, -0.35), (1.0, 0.35), (1.25, 0.35)))],
    "tvmonitor": [("poly", "body", _rect(0, -0.15, 1.6, 1.1)), ("poly", "body", _rect(0, 0.6, 0.15, 0.4)),
                  ("poly", "body", _rect(0, 0.85, 0.7, 0.1)), ("poly", "accent", _rect(0, -0.15, 1.3, 0.85))],
}

TEXTURES = ("stripes", "checker", "spots", "rings", "grain", "smooth", "hatch")


@dataclass(frozen=True)
class ClassStyle:
    """Colour distribution (HSV, 0..1) and texture of one class; accent = its distinctive part."""
    hue: float
    saturation: tuple[float, float]
    value: tuple[float, float]
    texture: str
    frequency: tuple[float, float]  # texture cycles per object half-size
    amplitude: float
    accent: tuple[float, float, float]


STYLES: dict[str, ClassStyle] = {
    "aeroplane": ClassStyle(0.58, (0.15, 0.4), (0.7, 0.9), "stripes", (0.8, 1.5), 0.3, (0.0, 0.8, 0.85)),
    "bicycle": ClassStyle(0.33, (0.6, 0.9), (0.5, 0.8), "smooth", (0.5, 1.0), 0.3, (0.15, 0.2, 0.2)),
    "bird": ClassStyle(0.10, (0.6, 0.9), (0.55, 0.85), "spots", (3.0, 5.0), 0.6, (0.13, 0.9, 0.95)),
    "boat": ClassStyle(0.0, (0.0, 0.15), (0.85, 0.98), "stripes", (2.0, 3.5), 0.35, (0.55, 0.7, 0.8)),
    "bottle": ClassStyle(0.38, (0.5, 0.8), (0.25, 0.5), "smooth", (0.5, 1.0), 0.3, (0.12, 0.3, 0.95)),
    "bus": ClassStyle(0.14, (0.75, 1.0), (0.8, 0.95), "grain", (4.0, 6.0), 0.3, (0.6, 0.3, 0.3)),
    "car": ClassStyle(0.0, (0.7, 0.95), (0.5, 0.8), "smooth", (0.5, 1.0), 0.4, (0.0, 0.0, 0.1)),
    "cat": ClassStyle(0.07, (0.5, 0.8), (0.6, 0.9), "stripes", (3.0, 4.5), 0.55, (0.07, 0.3, 0.35)),
    "chair": ClassStyle(0.08, (0.5, 0.7), (0.3, 0.5), "grain", (4.0, 6.0), 0.35, (0.6, 0.5, 0.6)),
    "cow": ClassStyle(0.0, (0.0, 0.1), (0.85, 0.95), "spots", (1.5, 2.5), 0.9, (0.05, 0.4, 0.5)),
    "diningtable": ClassStyle(0.07, (0.6, 0.8), (0.35, 0.55), "stripes", (5.0, 7.0), 0.3, (0.0, 0.0, 0.97)),
    "dog": ClassStyle(0.09, (0.35, 0.6), (0.45, 0.7), "grain", (3.0, 5.0), 0.35, (0.09, 0.6, 0.35)),
    "horse": ClassStyle(0.05, (0.6, 0.8), (0.3, 0.5), "smooth", (0.5, 1.0), 0.3, (0.0, 0.0, 0.1)),
    "motorbike": ClassStyle(0.0, (0.0, 0.1), (0.15, 0.3), "checker", (2.0, 3.0), 0.3, (0.97, 0.85, 0.8)),
    "person": ClassStyle(0.95, (0.5, 0.8), (0.6, 0.9), "checker", (2.0, 3.0), 0.4, (0.07, 0.35, 0.9)),
    "pottedplant": ClassStyle(0.04, (0.6, 0.8), (0.5, 0.7), "smooth", (0.5, 1.0), 0.3, (0.3, 0.75, 0.6)),
    "sheep": ClassStyle(0.12, (0.05, 0.2), (0.8, 0.95), "grain", (6.0, 8.0), 0.5, (0.0, 0.0, 0.15)),
    "sofa": ClassStyle(0.75, (0.4, 0.7), (0.4, 0.7), "hatch", (3.0, 5.0), 0.3, (0.75, 0.3, 0.85)),
    "train": ClassStyle(0.55, (0.6, 0.9), (0.4, 0.7), "stripes", (1.0, 1.5), 0.4, (0.14, 0.9, 0.95)),
    "tvmonitor": ClassStyle(0.6, (0.1, 0.3), (0.1, 0.3), "smooth", (0.5, 1.0), 0.3, (0.55, 0.8, 0.95)),
}

# Co-occurrence as in VOC; within a chosen subset a class without companions pairs with its neighbour.
COMPANIONS: dict[str, tuple[str, ...]] = {
    "person": ("bicycle", "motorbike", "horse", "boat", "chair", "sofa", "diningtable", "bottle", "tvmonitor",
               "car", "bus", "dog"),
    "cat": ("dog", "sofa", "chair"), "dog": ("cat", "sofa", "person"), "sheep": ("cow",), "cow": ("sheep", "horse"),
    "horse": ("person", "cow"), "bird": ("aeroplane", "boat"), "aeroplane": ("bird",), "chair": ("diningtable", "sofa"),
    "diningtable": ("chair", "bottle"), "bottle": ("diningtable", "person"), "tvmonitor": ("person", "sofa"),
    "sofa": ("cat", "pottedplant", "tvmonitor"), "pottedplant": ("sofa", "chair"), "train": ("car",),
    "car": ("bus", "train"), "bus": ("car", "person"), "bicycle": ("person", "car"), "motorbike": ("person", "car"),
    "boat": ("person", "bird"),
}

OBJECT_COUNT_PROBS = (0.45, 0.35, 0.20)  # 1, 2, 3 objects
OBJECT_SCALE = (0.22, 0.5)  # range of an object's half-size, in short image sides
MAX_CLUTTER = 8  # most background clutter shapes per image
COMPANION_PROB = 0.6
MIN_OBJECT_AREA = 0.025  # of the image, after truncation and occlusion
MIN_KEPT_FRACTION = 0.45  # of an object's in-image area that occluders must leave visible
_SPLIT_CODES = {"train": 1, "val": 2}


def hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One HSV colour (all 0..1) -> float RGB 0..255."""
    return np.asarray(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), np.float64) * 255.0


def texture_field(kind: str, u: np.ndarray, v: np.ndarray, frequency: float, rng: np.random.Generator) -> np.ndarray:
    """A pattern in 0..1 over local coordinates (u, v), with `frequency` cycles per unit."""
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * frequency * u + phase)
    if kind == "checker":
        return ((np.floor(frequency * u + phase) + np.floor(frequency * v)) % 2).astype(np.float32)
    if kind == "hatch":
        return np.maximum(0.5 + 0.5 * np.sin(2 * np.pi * frequency * u + phase), 0.5 + 0.5 * np.sin(2 * np.pi * frequency * v))
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * frequency * np.hypot(u, v) + phase)
    if kind == "spots":
        # a jittered lattice of round dots: the peaks of a product of two waves
        warp = 0.15 * np.sin(2 * np.pi * 0.5 * frequency * v + rng.uniform(0, 2 * np.pi))
        waves = np.sin(2 * np.pi * frequency * (u + warp) + phase) * np.sin(2 * np.pi * frequency * v + phase)
        return (waves > 0.55).astype(np.float32)
    if kind == "grain":
        cells = max(2, int(3 * frequency))
        noise = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
        x = np.clip((u + 1.5) / 3.0 * (cells - 1), 0, cells - 1).astype(np.float32)
        y = np.clip((v + 1.5) / 3.0 * (cells - 1), 0, cells - 1).astype(np.float32)
        x0, y0 = np.minimum(x.astype(np.int32), cells - 2), np.minimum(y.astype(np.int32), cells - 2)
        fx, fy = x - x0, y - y0
        top = noise[y0, x0] * (1 - fx) + noise[y0, x0 + 1] * fx
        bottom = noise[y0 + 1, x0] * (1 - fx) + noise[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy
    if kind == "smooth":
        return np.clip(0.5 + 0.35 * (u * np.cos(phase) + v * np.sin(phase)), 0, 1)
    raise ValueError(f"unknown texture {kind!r}; choose from {', '.join(TEXTURES)}")


@dataclass
class Placement:
    """One object: class and the affine map from its unit frame to pixels."""
    class_name: str
    centre: tuple[float, float]
    half_size: float
    angle: float
    aspect: float
    mirrored: bool

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        x = points[:, 0] * (-1 if self.mirrored else 1) * self.half_size * self.aspect
        y = points[:, 1] * self.half_size / self.aspect
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        return np.stack([self.centre[0] + cos * x - sin * y, self.centre[1] + sin * x + cos * y], axis=1)

    def local_coordinates(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Inverse map of the pixel grid to the unit frame (for textures that follow the object)."""
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = xs - self.centre[0], ys - self.centre[1]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = (cos * dx + sin * dy) / (self.half_size * self.aspect) * (-1 if self.mirrored else 1)
        v = (-sin * dx + cos * dy) * self.aspect / self.half_size
        return u, v


def _draw_primitive(canvas: np.ndarray, primitive: Primitive, placement: Placement, offset: float = 0.0) -> None:
    kind, _, geometry = primitive
    if kind == "ellipse":
        cx, cy, rx, ry = geometry
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        points = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)
    elif kind == "line":
        points = np.asarray(geometry[0], np.float64)
    else:
        points = np.asarray(geometry, np.float64)
    pixels = np.round((placement.to_pixels(points) + offset) * 16).astype(np.int32)  # 4 fractional bits
    if kind == "line":
        thickness = max(1, int(round(geometry[1] * placement.half_size)))
        cv2.polylines(canvas, [pixels], False, 1, thickness, cv2.LINE_8, shift=4)
    else:
        cv2.fillPoly(canvas, [pixels], 1, cv2.LINE_8, shift=4)


def object_masks(placement: Placement, height: int, width: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(whole-object mask, accent mask) on a canvas grown by `pad` pixels on every side."""
    whole = np.zeros((height + 2 * pad, width + 2 * pad), np.uint8)
    accent = np.zeros_like(whole)
    for primitive in SHAPES[placement.class_name]:
        _draw_primitive(whole, primitive, placement, pad)
        if primitive[1] == "accent":
            _draw_primitive(accent, primitive, placement, pad)
    return whole.astype(bool), accent.astype(bool)


def _random_colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    return hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value))


def render_background(height: int, width: int, rng: np.random.Generator, max_clutter: int = MAX_CLUTTER) -> np.ndarray:
    """Gradient + a random texture + min(3, max_clutter)..max_clutter random clutter shapes, all independent
    of the classes."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (xs - width / 2) / (min(height, width) / 2), (ys - height / 2) / (min(height, width) / 2)
    first, second = _random_colour(rng, (0.0, 0.5), (0.25, 0.9)), _random_colour(rng, (0.0, 0.5), (0.25, 0.9))
    ramp = texture_field("smooth", u, v, 1.0, rng)[..., None]
    image = (first * (1 - ramp) + second * ramp).astype(np.float32)
    pattern = texture_field(str(rng.choice(TEXTURES)), u, v, rng.uniform(1.0, 6.0), rng)[..., None]
    image = image * (1 - 0.25 * pattern) + np.float32(255.0 * 0.25 * rng.uniform(0.3, 0.8)) * pattern
    for _ in range(int(rng.integers(min(3, max_clutter), max_clutter + 1))):
        clutter = np.zeros((height, width), np.uint8)
        centre = rng.uniform(0, 1, 2) * (width, height)
        size = rng.uniform(0.05, 0.3) * min(height, width)
        shape = int(rng.integers(3))
        if shape == 0:
            cv2.ellipse(clutter, (int(centre[0]), int(centre[1])), (int(size), int(size * rng.uniform(0.3, 1))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif shape == 1:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            radii = size * rng.uniform(0.4, 1.0, len(angles))
            points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
            cv2.fillPoly(clutter, [points.astype(np.int32)], 1)
        else:
            end = centre + rng.uniform(-2, 2, 2) * size
            cv2.line(clutter, (int(centre[0]), int(centre[1])), (int(end[0]), int(end[1])), 1, int(rng.integers(1, 5)))
        inside = clutter.astype(bool)
        colour = _random_colour(rng, (0.0, 0.6), (0.2, 0.95)).astype(np.float32)
        texture = texture_field(str(rng.choice(TEXTURES)), u[inside], v[inside], rng.uniform(1.0, 8.0), rng)[:, None]
        image[inside] = colour * (1 - 0.3 * texture) + 0.3 * texture * 128.0
    return image


def paint_object(image: np.ndarray, placement: Placement, whole: np.ndarray, accent: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    style = STYLES[placement.class_name]
    height, width = image.shape[:2]
    u, v = placement.local_coordinates(height, width)
    body = hsv_to_rgb(style.hue + rng.normal(0, 0.02), rng.uniform(*style.saturation), rng.uniform(*style.value))
    shade = body * 0.45 if body.mean() > 110 else body * 0.4 + 150.0
    pattern = texture_field(style.texture, u[whole], v[whole], rng.uniform(*style.frequency), rng)[:, None] * style.amplitude
    accent_hue, accent_saturation, accent_value = style.accent
    accent_colour = hsv_to_rgb(accent_hue + rng.normal(0, 0.02), np.clip(accent_saturation + rng.normal(0, 0.05), 0, 1),
                               np.clip(accent_value + rng.normal(0, 0.05), 0, 1))
    image = image.copy()
    image[whole] = body * (1 - pattern) + shade * pattern
    image[accent] = accent_colour
    return image


def _choose_classes(classes: Sequence[str], rng: np.random.Generator) -> list[str]:
    count = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS)) + 1
    chosen = [str(rng.choice(classes))]
    for _ in range(count - 1):
        companions = [c for anchor in chosen for c in COMPANIONS[anchor] if c in classes]
        if not companions:
            neighbour = classes[(classes.index(chosen[0]) + 1) % len(classes)]
            companions = [neighbour] if neighbour != chosen[0] else []
        if companions and rng.random() < COMPANION_PROB:
            chosen.append(str(rng.choice(companions)))
        else:
            chosen.append(str(rng.choice(classes)))
    return chosen


def layout_objects(class_names: Sequence[str], height: int, width: int, rng: np.random.Generator, attempts: int = 25,
                   object_scale: tuple[float, float] = OBJECT_SCALE) -> tuple[list[Placement], np.ndarray, list[np.ndarray]]:
    """Place objects one over another; a placement is kept when it and every earlier object stay visible.

    Returns placements, the instance map (0 = background, k = placement k-1) and accent masks.
    """
    instances = np.zeros((height, width), np.int32)
    placements: list[Placement] = []
    accents: list[np.ndarray] = []
    in_image_areas: list[int] = []
    short_side = min(height, width)
    for class_name in class_names:
        for _ in range(attempts):
            placement = Placement(class_name, (rng.uniform(0, width), rng.uniform(0, height)),
                                  rng.uniform(*object_scale) * short_side, rng.uniform(-0.6, 0.6),
                                  float(np.exp(rng.uniform(-0.25, 0.25))), bool(rng.random() < 0.5))
            pad = int(2 * placement.half_size) + 2
            whole_padded, accent_padded = object_masks(placement, height, width, pad)
            whole = whole_padded[pad:pad + height, pad:pad + width]
            area = int(whole.sum())
            if area < MIN_OBJECT_AREA * height * width or area < MIN_KEPT_FRACTION * whole_padded.sum():
                continue
            trial = np.where(whole, len(placements) + 1, instances)
            if all((trial == k + 1).sum() >= MIN_KEPT_FRACTION * in_image_areas[k] for k in range(len(placements))):
                instances = trial
                placements.append(placement)
                accents.append(accent_padded[pad:pad + height, pad:pad + width])
                in_image_areas.append(area)
                break
    return placements, instances, accents


def border_band(instances: np.ndarray, width: int) -> np.ndarray:
    """Pixels whose (width x width) neighbourhood holds two instance ids (object/background/other object)."""
    kernel = np.ones((width, width), np.uint8)
    ids = instances.astype(np.float32)
    return cv2.dilate(ids, kernel) != cv2.erode(ids, kernel)


def annotation_xml(image_id: str, height: int, width: int, objects: list[tuple[str, tuple[int, int, int, int], bool]]) -> bytes:
    """VOC XML: one <object> per instance with a 1-based inclusive bounding box."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = image_id + ".jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for class_name, (xmin, ymin, xmax, ymax), truncated in objects:
        element = ET.SubElement(root, "object")
        ET.SubElement(element, "name").text = class_name
        ET.SubElement(element, "pose").text = "Unspecified"
        ET.SubElement(element, "truncated").text = str(int(truncated))
        ET.SubElement(element, "difficult").text = "0"
        box = ET.SubElement(element, "bndbox")
        for tag, value in (("xmin", xmin), ("ymin", ymin), ("xmax", xmax), ("ymax", ymax)):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


@dataclass
class SyntheticSample:
    image: np.ndarray  # (H,W,3) uint8 RGB
    mask: np.ndarray  # (H,W) uint8 class index, 255 on the border band
    objects: list[tuple[str, tuple[int, int, int, int], bool]]  # class, 1-based box, truncated
    label: np.ndarray  # float32[20]
    placements: list[Placement]  # drawn in this order, each over the earlier ones
    instances: np.ndarray  # (H,W) int32: 0 = background, k = placements[k - 1] visible


def generate_sample(rng: np.random.Generator, classes: Sequence[str], size_min: int, size_max: int,
                    border_width: int = 3, noise_sigma: float = 4.0, object_scale: tuple[float, float] = OBJECT_SCALE,
                    max_clutter: int = MAX_CLUTTER) -> SyntheticSample:
    height, width = (int(v) for v in rng.integers(size_min, size_max + 1, 2))
    image = render_background(height, width, rng, max_clutter)
    placements, instances, accents = layout_objects(_choose_classes(list(classes), rng), height, width, rng,
                                                    object_scale=object_scale)
    class_map = np.zeros((height, width), np.uint8)
    objects = []
    label = np.zeros(NUM_CLASSES, np.float32)
    for k, placement in enumerate(placements):
        visible = instances == k + 1
        image = paint_object(image, placement, visible, accents[k] & visible, rng)
        class_map[visible] = CLASS_INDEX[placement.class_name] + 1
        rows, cols = np.nonzero(visible)
        truncated = bool(rows.min() == 0 or cols.min() == 0 or rows.max() == height - 1 or cols.max() == width - 1)
        objects.append((placement.class_name, (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1,
                                               int(rows.max()) + 1), truncated))
        label[CLASS_INDEX[placement.class_name]] = 1.0
    image = cv2.GaussianBlur(image.astype(np.float32), (3, 3), 0.7) + rng.normal(0, noise_sigma, image.shape)
    mask = class_map.copy()
    mask[border_band(instances, border_width)] = IGNORE_LABEL
    return SyntheticSample(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask, objects, label, placements,
                           instances)


def parse_classes(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Class subset from names (a comma-separated string or a sequence); 'all' = the 20 VOC classes."""
    if spec is None:
        return DEFAULT_CLASSES
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return CLASS_NAMES
    unknown = [n for n in names if n not in CLASS_INDEX]
    if unknown or not names:
        raise ValueError(f"unknown class name(s) {unknown} in --classes; valid: all, {', '.join(CLASS_NAMES)}")
    return tuple(dict.fromkeys(names))


def generate_dataset(out: PathLike, num_train: int, num_val: int, seed: int = 0, *, size_min: int = 128,
                     size_max: int = 192, classes: str | Sequence[str] | None = None, border_width: int = 3,
                     jpeg_quality: int = 92, object_scale: tuple[float, float] = OBJECT_SCALE,
                     max_clutter: int = MAX_CLUTTER) -> dict[str, int]:
    """Write the synthetic VOC tree under `out`; returns image counts per list."""
    check_generator_options(num_train, num_val, size_min, size_max)
    if border_width < 1 or border_width % 2 == 0:
        raise ValueError(f"border_width must be an odd positive number of pixels, got {border_width}")
    if not 0 < object_scale[0] <= object_scale[1] <= 1:
        raise ValueError(f"object_scale must be 0 < min <= max <= 1 (half-size / short side), got {tuple(object_scale)}")
    if max_clutter < 0:
        raise ValueError(f"max_clutter must be >= 0, got {max_clutter}")
    class_subset = parse_classes(classes)
    for folder in (IMAGE_DIR, ANNOTATION_DIR, MASK_DIR):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    labels: dict[str, np.ndarray] = {}
    split_ids: dict[str, list[str]] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        split_ids[split] = []
        for index in range(count):
            image_id = f"{split}_{index:06d}"
            # one stream per image: an image does not change when the other split's size changes
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            sample = generate_sample(rng, class_subset, size_min, size_max, border_width,
                                     object_scale=tuple(object_scale), max_clutter=max_clutter)
            Image.fromarray(sample.image).save(os.path.join(out, IMAGE_DIR, image_id + ".jpg"), quality=jpeg_quality)
            write_palette_mask(os.path.join(out, MASK_DIR, image_id + ".png"), sample.mask)
            with open(os.path.join(out, ANNOTATION_DIR, image_id + ".xml"), "wb") as handle:
                handle.write(annotation_xml(image_id, *sample.mask.shape, sample.objects))
            labels[image_id] = sample.label
            split_ids[split].append(image_id)
    write_id_list(default_list_path(out, "train"), split_ids["train"])
    write_id_list(default_list_path(out, "val"), split_ids["val"])
    write_id_list(default_list_path(out, "train_aug"), split_ids["train"])
    save_cls_labels(default_cls_labels_path(out), labels)
    return {"train": num_train, "val": num_val, "train_aug": num_train}


def check_generator_options(num_train: int, num_val: int, size_min: int, size_max: int) -> None:
    """The image counts and sizes every synthetic generator takes (`add_generator_arguments`)."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be positive, got {num_train} and {num_val}")
    if not 32 <= size_min <= size_max:
        raise ValueError(f"need 32 <= size_min <= size_max, got size_min={size_min}, size_max={size_max}")


def add_generator_arguments(parser: argparse.ArgumentParser, out_help: str, split_help: tuple[str, str],
                            counts: tuple[int, int], sizes: tuple[int, int]) -> None:
    """The flags every synthetic generator has: --out, --num_train, --num_val, --seed, --size_min, --size_max."""
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--num_train", type=int, default=counts[0], help=f"images in {split_help[0]}")
    parser.add_argument("--num_val", type=int, default=counts[1], help=f"images in {split_help[1]}")
    parser.add_argument("--seed", type=int, default=0, help="the output is a pure function of the options")
    parser.add_argument("--size_min", type=int, default=sizes[0], help="smallest image side in pixels")
    parser.add_argument("--size_max", type=int, default=sizes[1], help="largest image side in pixels")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generator_arguments(parser, "root of the VOC-format tree to write (the --voc12_root)",
                            ("train.txt / train_aug.txt", "val.txt"), (200, 50), (128, 192))
    parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                        help="comma-separated VOC class names, or 'all' for the 20 classes")
    parser.add_argument("--border_width", type=int, default=3, help="odd width of the 255 band along object borders")
    parser.add_argument("--object_scale", type=float, nargs=2, default=OBJECT_SCALE, metavar=("MIN", "MAX"),
                        help="range of an object's half-size as a fraction of the short image side")
    parser.add_argument("--max_clutter", type=int, default=MAX_CLUTTER, help="most background clutter shapes per image")
    args = parser.parse_args(argv)
    try:
        counts = generate_dataset(args.out, args.num_train, args.num_val, args.seed, size_min=args.size_min,
                                  size_max=args.size_max, classes=args.classes, border_width=args.border_width,
                                  object_scale=tuple(args.object_scale), max_clutter=args.max_clutter)
    except ValueError as err:
        parser.error(str(err))
    classes = parse_classes(args.classes)
    print(f"wrote {args.out}: train {counts['train']}, val {counts['val']}, train_aug {counts['train_aug']} images; "
          f"classes: {', '.join(classes)}")


if __name__ == "__main__":
    main()

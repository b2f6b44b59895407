"""Built-in line simulator: binarised PCB line-scan frames with known defects.

The quick start and the tests run without any data set, so Faultline renders
its own frames in the style of DeepPCB, the data the demo model is trained on.
Frames are 8-bit mono images with copper black (0) on white board (255) and
nothing in between.

What it models: one copper layer seen from above after binarisation. A board
has traces routed at 0, 45 and 90 degrees in several widths (often as buses of
parallel traces), round and rectangular pads, vias with drilled holes and
sometimes a copper pour with clearance cut around the features. Each frame then
receives defects of the six DeepPCB classes, each drawn where it makes sense
(an open across a trace, a short between two copper features, a spur into bare
board, a pin-hole inside copper) and never overlapping another defect. The
ground-truth box of a defect encloses the pixels it changed, padded by 3 px and
grown to at least 24 px.

What it does not model: grey levels, scanner noise and blur before
binarisation, misregistration, silkscreen, inner layers, the template and test
image pairs of DeepPCB, or the class and size distribution of a real line
(classes are drawn about uniformly). Everything is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

PCB_CLASSES: tuple[str, ...] = (
    "open",
    "short",
    "mousebite",
    "spur",
    "copper",
    "pin-hole",
)

CONTENT_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "bmp": "image/bmp",
}
_FILE_SUFFIXES: dict[str, str] = {"jpeg": ".jpg", "png": ".png", "bmp": ".bmp"}

MIN_DEFECTS = 3
MAX_DEFECTS = 12
MIN_SIDE_PX = 256

COPPER = 0
BOARD = 255

# In the DeepPCB labels, 99 % of box sides are at least about 24 px, so a
# smaller defect gets its box grown to 24 px around its changed pixels.
_BOX_PAD_PX = 3
_BOX_MIN_PX = 24
_BOX_MAX_PX = 60
_BOX_GAP_PX = 2

# A defect's anchor keeps this distance from the image border, so its box is
# never clipped below the minimum size.
_EDGE_MARGIN_PX = 34
# Every defect shape lies within this distance of its anchor, so the pixel
# difference is taken over that window only.
_REACH_PX = 48
_ATTEMPTS_PER_CLASS = 30
# Largest pin-hole semi-axis and copper blob radius, and the distance that a
# site keeps around each to the nearest copper edge or feature.
_PIN_HOLE_MAX_PX = 6
_BLOB_MAX_PX = 12
_PIN_HOLE_REACH_PX = _PIN_HOLE_MAX_PX + 5
_BLOB_REACH_PX = _BLOB_MAX_PX + 8

# Half widths of ordinary traces. Wide power strips have their own range.
_TRACE_HALF_WIDTHS_PX = (3, 4, 4, 5, 6, 8, 10, 12, 16, 20)
_FEATURE_GAP_PX = 10
# Trace segments shorter than this inside the margins get no trace defects:
# the cross-section checks around a defect would reach both ends.
_MIN_SEGMENT_PX = 60
_GRID_PX = 4

# Unit vectors at 45 degree steps, index 0 pointing along +x (image coordinates).
_HEADINGS = np.array(
    [(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4], dtype=np.float64
)


@dataclass(frozen=True)
class GroundTruth:
    """One injected defect, with its box in source-image pixels (xyxy)."""

    class_id: int
    class_name: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True, eq=False)
class SimulatedFrame:
    """A rendered board: uint8 mono image of 0 and 255, and its defects.

    Frames compare by identity because the image is a numpy array.
    """

    image: np.ndarray
    defects: tuple[GroundTruth, ...]
    seed: int


@dataclass(frozen=True, eq=False)
class SimulatedShot:
    """One frame as a camera of a simulated line sends it."""

    camera_id: str
    sequence: int
    frame: SimulatedFrame
    payload: bytes
    content_type: str


# ---------------------------------------------------------------------------
# Board layout


@dataclass(frozen=True)
class _Shape:
    """A copper primitive. `half` is half the line width, the disc radius or
    half the side of the square box."""

    kind: str  # "line" (a polyline through points), "disc" or "box" (one centre)
    points: tuple[tuple[float, float], ...]
    half: float


@dataclass(frozen=True)
class _Feature:
    """One electrically separate piece of copper with its drilled holes."""

    shapes: tuple[_Shape, ...]
    holes: tuple[_Shape, ...] = ()
    # A bare feature is a keep-out, so its shapes are cut out of the pour.
    bare: bool = False


@dataclass(frozen=True)
class _Segment:
    start: np.ndarray
    end: np.ndarray
    half: float
    feature_id: int


@dataclass(frozen=True)
class _Layout:
    """The clean board and what the defect planners need to know about it."""

    image: np.ndarray
    # Feature id per pixel: 0 is bare board or a drilled hole, 1 the pour,
    # 2 and up the features.
    ids: np.ndarray
    segments: tuple[_Segment, ...]
    # Non-zero where a pin-hole fits inside copper, or a blob on bare board
    # with clearance to all copper.
    copper_sites: np.ndarray
    bare_sites: np.ndarray


def _draw_shape(
    canvas: np.ndarray, shape: _Shape, value: int, grow: float = 0.0, scale: int = 1
) -> None:
    points = [(round(x / scale), round(y / scale)) for x, y in shape.points]
    half = (shape.half + grow) / scale
    if shape.kind == "line":
        thickness = max(1, round(2 * half))
        for start, end in zip(points[:-1], points[1:], strict=True):
            cv2.line(canvas, start, end, value, thickness)
    elif shape.kind == "disc":
        cv2.circle(canvas, points[0], max(1, round(half)), value, -1)
    else:
        (x, y), corner = points[0], round(half)
        cv2.rectangle(
            canvas, (x - corner, y - corner), (x + corner, y + corner), value, -1
        )


def _draw_feature(
    canvas: np.ndarray, feature: _Feature, value: int, grow: float = 0.0, scale: int = 1
) -> None:
    for shape in feature.shapes:
        _draw_shape(canvas, shape, value, grow, scale)


def _route(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Make a random polyline of 1 to 3 segments with 45 or 90 degree bends."""
    start = rng.uniform((-0.1 * width, -0.1 * height), (1.1 * width, 1.1 * height))
    heading = 2 * int(rng.integers(4)) + int(rng.random() < 0.25)
    points = [start]
    for _ in range(int(rng.integers(1, 4))):
        length = rng.uniform(100.0, 0.8 * max(width, height))
        points.append(points[-1] + length * _HEADINGS[heading])
        heading = (heading + _pick(rng, (-2, -1, 1, 2))) % 8
    return np.array(points)


def _miter_normals(path: np.ndarray) -> np.ndarray:
    """Compute per-vertex offsets that shift a polyline sideways by 1 px.

    At a bend the vertex moves along the bisector, scaled so that both
    segments end up 1 px away (a mitred join). Callers multiply by the offset.
    """
    directions = np.diff(path, axis=0)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    normals = np.stack([-directions[:, 1], directions[:, 0]], axis=1)
    miters = np.empty_like(path)
    miters[0], miters[-1] = normals[0], normals[-1]
    before, after = normals[:-1], normals[1:]
    cosines = np.sum(before * after, axis=1, keepdims=True)
    miters[1:-1] = (before + after) / (1.0 + cosines)
    return miters


def _pick(rng: np.random.Generator, options: tuple) -> Any:
    """Return a random one of `options`, faster than Generator.choice on a tuple."""
    return options[int(rng.integers(len(options)))]


def _end_pad(
    rng: np.random.Generator, centre: np.ndarray, half: float, max_radius: float
) -> _Feature | None:
    """Make a pad for a trace end, or None when no pad fits in `max_radius`."""
    point = (tuple(centre.tolist()),)
    # Square pads only end lone traces, because on a diagonal bus neighbouring
    # square pads would touch.
    kinds = (
        ("round", "round", "square", "via")
        if np.isinf(max_radius)
        else ("round", "via")
    )
    kind = _pick(rng, kinds)
    if kind == "square":
        half_side = min(max_radius, rng.uniform(12.0, 26.0))
        if half_side < half + 4:
            return None
        return _Feature((_Shape("box", point, half_side),))
    radius = rng.uniform(12.0, 30.0) if kind == "round" else rng.uniform(10.0, 18.0)
    radius = min(max_radius, radius)
    if radius < half + 4:
        return None
    hole = _Shape("disc", point, radius * rng.uniform(0.35, 0.5))
    return _Feature((_Shape("disc", point, radius),), (hole,))


def _bus_group(rng: np.random.Generator, width: int, height: int) -> list[_Feature]:
    """Lay out 1 to 8 parallel traces, some of them ending in pads."""
    half = float(_pick(rng, _TRACE_HALF_WIDTHS_PX))
    count = _pick(rng, (1, 1, 1, 2, 2, 3, 4, 5, 6, 8))
    gap = rng.uniform(8.0, 30.0)
    pitch = 2 * half + gap
    # Pads on neighbouring traces keep a third of the trace gap between them.
    # A lone trace takes any pad size.
    max_radius = np.inf if count == 1 else half + gap / 3
    path = _route(rng, width, height)
    miters = _miter_normals(path)
    group = []
    for index in range(count):
        line = path + (index - (count - 1) / 2) * pitch * miters
        shapes = [_Shape("line", tuple(map(tuple, line.tolist())), half)]
        holes: list[_Shape] = []
        for end in (line[0], line[-1]):
            inside = 0 <= end[0] < width and 0 <= end[1] < height
            pad = _end_pad(rng, end, half, max_radius) if inside else None
            if pad is not None and rng.random() < 0.6:
                shapes.extend(pad.shapes)
                holes.extend(pad.holes)
        group.append(_Feature(tuple(shapes), tuple(holes)))
    return group


def _pad_row_group(rng: np.random.Generator, width: int, height: int) -> list[_Feature]:
    """Lay out a row of 2 to 5 component pads, each with a short trace stub."""
    half = rng.uniform(10.0, 24.0)
    pitch = 2 * half + rng.uniform(12.0, 30.0)
    axis = int(rng.integers(2))
    step = np.zeros(2)
    step[axis] = pitch
    stub = np.zeros(2)
    stub[1 - axis] = _pick(rng, (-1.0, 1.0)) * rng.uniform(30.0, 90.0)
    stub_half = min(half - 3, float(_pick(rng, _TRACE_HALF_WIDTHS_PX)))
    kind = "box" if rng.random() < 0.7 else "disc"
    origin = rng.uniform((0.0, 0.0), (width, height))
    group = []
    for index in range(int(rng.integers(2, 6))):
        centre = origin + index * step
        point = (tuple(centre.tolist()),)
        trace = _Shape("line", (point[0], tuple((centre + stub).tolist())), stub_half)
        group.append(_Feature((_Shape(kind, point, half), trace)))
    return group


def _via_group(rng: np.random.Generator, width: int, height: int) -> list[_Feature]:
    """Lay out 1 to 3 vias close together."""
    origin = rng.uniform((0.0, 0.0), (width, height))
    group = []
    for _ in range(int(rng.integers(1, 4))):
        centre = origin + rng.uniform(-60.0, 60.0, 2)
        point = (tuple(centre.tolist()),)
        radius = rng.uniform(11.0, 20.0)
        hole = _Shape("disc", point, radius * rng.uniform(0.35, 0.5))
        group.append(_Feature((_Shape("disc", point, radius),), (hole,)))
    return group


def _strip_group(rng: np.random.Generator, width: int, height: int) -> list[_Feature]:
    """Lay out one wide power strip across the frame."""
    path = _route(rng, width, height)[:2]
    strip = _Shape("line", tuple(map(tuple, path.tolist())), rng.uniform(26.0, 45.0))
    return [_Feature((strip,))]


def _keepout_group(rng: np.random.Generator, width: int, height: int) -> list[_Feature]:
    """Lay out a round keep-out, bare board cut out of the pour around a hole."""
    centre = (tuple(rng.uniform((0.0, 0.0), (width, height)).tolist()),)
    return [_Feature((_Shape("disc", centre, rng.uniform(30.0, 60.0)),), bare=True)]


_GROUP_MAKERS = (_bus_group, _pad_row_group, _via_group, _strip_group, _keepout_group)
_GROUP_CUMULATIVE_WEIGHTS = np.cumsum((0.62, 0.14, 0.12, 0.05, 0.07))


def _place_groups(
    rng: np.random.Generator, width: int, height: int, has_pour: bool
) -> list[_Feature]:
    """Lay out random feature groups, keeping those that clear the ones kept so far.

    Clearance is checked on a grid 4 times coarser than the image, which is
    enough for the feature gap and far cheaper than a full-size check.
    """
    grid_shape = (-(-height // _GRID_PX), -(-width // _GRID_PX))
    occupied = np.zeros(grid_shape, np.uint8)
    scratch = np.zeros(grid_shape, np.uint8)
    target = int(rng.integers(12, 32))
    features: list[_Feature] = []
    for _ in range(3 * target):
        draw = rng.random() * _GROUP_CUMULATIVE_WEIGHTS[-1]
        maker = _GROUP_MAKERS[int(np.searchsorted(_GROUP_CUMULATIVE_WEIGHTS, draw))]
        if maker is _keepout_group and not has_pour:
            continue
        group = maker(rng, width, height)
        scratch.fill(0)
        for feature in group:
            _draw_feature(scratch, feature, 1, _FEATURE_GAP_PX / 2, _GRID_PX)
        if np.any(scratch & occupied):
            continue
        occupied |= scratch
        features.extend(group)
        if len(features) >= target:
            break
    return features


def _draw_pour_shape(ids: np.ndarray, rng: np.random.Generator) -> None:
    """Fill an ellipse or a rectangle with one chamfered corner with pour copper."""
    height, width = ids.shape
    if rng.random() < 0.6:
        centre = rng.uniform((-0.2 * width, -0.2 * height), (1.2 * width, 1.2 * height))
        axes = rng.uniform(0.5, 1.1, 2) * (width, height)
        centre_px = tuple(np.rint(centre).astype(int).tolist())
        axes_px = tuple(np.rint(axes).astype(int).tolist())
        cv2.ellipse(ids, centre_px, axes_px, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        return
    x1, x2 = np.sort(rng.uniform(-0.2, 1.2, 2)) * width
    y1, y2 = np.sort(rng.uniform(-0.2, 1.2, 2)) * height
    cut = rng.uniform(0.1, 0.4) * min(x2 - x1, y2 - y1)
    corners = [(x1 + cut, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1 + cut)]
    cv2.fillPoly(ids, [np.rint(corners).astype(np.int32)], 1)


def _draw_pour(ids: np.ndarray, rng: np.random.Generator) -> None:
    """Draw a copper pour that covers a quarter to 85 % of the frame, like the
    ground planes of many DeepPCB boards. The last of 4 tries is kept anyway."""
    for _ in range(4):
        ids.fill(0)
        _draw_pour_shape(ids, rng)
        if 0.25 <= cv2.countNonZero(ids) / ids.size <= 0.85:
            return


def _clip_segment(
    start: np.ndarray, end: np.ndarray, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Clip a segment to the box [low, high] with the Liang-Barsky method.

    Returns None when the segment lies outside the box.
    """
    delta = end - start
    first, last = 0.0, 1.0
    for axis in range(2):
        for step, room in (
            (-delta[axis], start[axis] - low[axis]),
            (delta[axis], high[axis] - start[axis]),
        ):
            if step == 0:
                if room < 0:
                    return None
            elif step < 0:
                first = max(first, room / step)
            else:
                last = min(last, room / step)
    if first >= last:
        return None
    return start + first * delta, start + last * delta


def _collect_segments(
    features: list[_Feature], width: int, height: int
) -> tuple[_Segment, ...]:
    """List the trace segments, clipped to where defects may sit."""
    low = np.array([_EDGE_MARGIN_PX, _EDGE_MARGIN_PX], np.float64)
    high = np.array([width - _EDGE_MARGIN_PX, height - _EDGE_MARGIN_PX], np.float64)
    segments = []
    for feature_id, feature in enumerate(features, start=2):
        for shape in feature.shapes:
            if shape.kind != "line":
                continue
            points = np.asarray(shape.points)
            for start, end in zip(points[:-1], points[1:], strict=True):
                clipped = _clip_segment(start, end, low, high)
                if (
                    clipped is not None
                    and np.hypot(*(clipped[1] - clipped[0])) >= _MIN_SEGMENT_PX
                ):
                    segments.append(_Segment(*clipped, shape.half, feature_id))
    return tuple(segments)


def _sites(mask: np.ndarray, reach: int) -> np.ndarray:
    """Mark the pixels whose square neighbourhood of `reach` px is all non-zero."""
    kernel = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    return cv2.erode(mask, kernel)


def _draw_layout(rng: np.random.Generator, width: int, height: int) -> _Layout:
    """Render the clean board. Defects are drawn later on a copy of its image."""
    has_pour = rng.random() < 0.6
    features = _place_groups(rng, width, height, has_pour)
    ids = np.zeros((height, width), np.uint16)
    if has_pour:
        _draw_pour(ids, rng)
        clearance = rng.uniform(8.0, 16.0)
        for feature in features:
            _draw_feature(ids, feature, 0, clearance)
    for feature_id, feature in enumerate(features, start=2):
        _draw_feature(ids, feature, 0 if feature.bare else feature_id)
    for feature in features:
        for hole in feature.holes:
            _draw_shape(ids, hole, 0)
    bare = (ids == 0).view(np.uint8)
    return _Layout(
        image=bare * np.uint8(BOARD),
        ids=ids,
        segments=_collect_segments(features, width, height),
        copper_sites=_sites(1 - bare, _PIN_HOLE_REACH_PX),
        bare_sites=_sites(bare, _BLOB_REACH_PX),
    )


# ---------------------------------------------------------------------------
# Defects


@dataclass(frozen=True)
class _Edit:
    """A planned defect whose `draw` changes pixels only near the anchor.

    "Near" means within _REACH_PX on both axes.
    """

    anchor: tuple[int, int]
    draw: Callable[[np.ndarray], None]


@dataclass(frozen=True)
class _TracePoint:
    """A point on a trace centre line, with the trace's local frame."""

    centre: np.ndarray
    along: np.ndarray
    normal: np.ndarray
    half: float
    feature_id: int

    def at(
        self, along_px: np.ndarray | float, across_px: np.ndarray | float
    ) -> np.ndarray:
        """Map offsets along and across the trace to image xy, broadcasting."""
        along_px = np.asarray(along_px, np.float64)[..., None]
        across_px = np.asarray(across_px, np.float64)[..., None]
        return self.centre + along_px * self.along + across_px * self.normal


def _sample(ids: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Read the ids at xy points of shape (..., 2). Points outside read -1."""
    xy = np.rint(points).astype(np.int64)
    x, y = xy[..., 0], xy[..., 1]
    height, width = ids.shape
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    values = np.full(x.shape, -1, np.int64)
    values[inside] = ids[y[inside], x[inside]]
    return values


def _pick_site(sites: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Return one of 32 random points inside the margins that is a site, if any."""
    height, width = sites.shape
    low = (_EDGE_MARGIN_PX, _EDGE_MARGIN_PX)
    high = (width - _EDGE_MARGIN_PX, height - _EDGE_MARGIN_PX)
    points = rng.uniform(low, high, (32, 2))
    x, y = np.rint(points).astype(np.int64).T
    hits = np.flatnonzero(sites[y, x])
    return points[hits[0]] if hits.size else None


def _pick_trace_point(
    layout: _Layout, rng: np.random.Generator, min_half: float, max_half: float
) -> _TracePoint | None:
    segments = [s for s in layout.segments if min_half <= s.half <= max_half]
    if not segments:
        return None
    segment = segments[int(rng.integers(len(segments)))]
    vector = segment.end - segment.start
    centre = segment.start + rng.uniform(0.1, 0.9) * vector
    along = vector / np.hypot(*vector)
    normal = np.array([-along[1], along[0]])
    return _TracePoint(centre, along, normal, segment.half, segment.feature_id)


def _is_plain_trace(
    ids: np.ndarray, point: _TracePoint, along_px: np.ndarray, sides: tuple[int, ...]
) -> bool:
    """Check that the trace runs straight through the given cross-sections:
    its own copper across its width and bare board just beyond each side."""
    along = np.asarray(along_px, np.float64)[:, None]
    inner = np.arange(-point.half + 1.5, point.half - 1.0)
    if np.any(_sample(ids, point.at(along, inner[None, :])) != point.feature_id):
        return False
    for side in sides:
        outer = side * np.arange(point.half + 2.5, point.half + 8.0)
        if np.any(_sample(ids, point.at(along, outer[None, :])) != 0):
            return False
    return True


def _anchor(points: np.ndarray) -> tuple[int, int]:
    x, y = np.rint(np.asarray(points).reshape(-1, 2).mean(axis=0)).astype(int)
    return int(x), int(y)


def _fill(polygon: np.ndarray, value: int) -> Callable[[np.ndarray], None]:
    vertices = np.rint(polygon).astype(np.int32)
    return lambda image: cv2.fillPoly(image, [vertices], value)


def _polyline(
    points: np.ndarray, thickness: int, value: int
) -> Callable[[np.ndarray], None]:
    vertices = np.rint(points).astype(np.int32)
    return lambda image: cv2.polylines(image, [vertices], False, value, thickness)


def _plan_open(layout: _Layout, rng: np.random.Generator) -> _Edit | None:
    """Cut a gap across a trace, with slanted and ragged cut edges."""
    point = _pick_trace_point(layout, rng, 3, 20)
    if point is None:
        return None
    gap = rng.uniform(5.0, 14.0)
    checks = np.linspace(-gap / 2 - 6, gap / 2 + 6, 5)
    if not _is_plain_trace(layout.ids, point, checks, (-1, 1)):
        return None
    across = np.array([-1.0, -1.0, 1.0, 1.0]) * (point.half + 3)
    slant = rng.uniform(-4.0, 4.0) * across / (point.half + 3)
    along = np.array([-gap, gap, gap, -gap]) / 2 + slant + rng.uniform(-2.0, 2.0, 4)
    polygon = point.at(along, across)
    return _Edit(_anchor(polygon), _fill(polygon, BOARD))


def _plan_short(layout: _Layout, rng: np.random.Generator) -> _Edit | None:
    """Bridge the bare gap between a trace and the nearest other copper."""
    point = _pick_trace_point(layout, rng, 3, 24)
    if point is None:
        return None
    side = _pick(rng, (-1, 1))
    across = side * (point.half + np.arange(2.0, 50.0))
    rays = _sample(layout.ids, point.at(np.array([-5.0, 0.0, 5.0])[:, None], across))
    # Index i on a ray is i + 2 px beyond the trace edge.
    hit = np.argmax(rays != 0, axis=1)
    targets = rays[np.arange(3), hit]
    if np.any(targets <= 0):
        return None
    if np.any(targets == point.feature_id) or np.ptp(hit) > 6 or not 6 <= hit[1] <= 42:
        return None
    gap = float(abs(across[hit[1]])) - point.half
    fractions = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    offsets = side * (point.half - 2 + fractions * (gap + 4))
    wiggle = np.concatenate([[0.0], rng.uniform(-6.0, 6.0, 2), [0.0]]) + rng.uniform(
        -4, 4
    )
    bridge = point.at(wiggle, offsets)
    return _Edit(_anchor(bridge), _polyline(bridge, int(rng.integers(2, 5)), COPPER))


def _plan_mousebite(layout: _Layout, rng: np.random.Generator) -> _Edit | None:
    """Take 1 to 3 round bites out of one edge of a trace.

    The bites sit side by side with a gap of at least 1 px, because
    overlapping bites would leave islands of copper at the edge.
    """
    point = _pick_trace_point(layout, rng, 6, 24)
    if point is None:
        return None
    side = _pick(rng, (-1, 1))
    if not _is_plain_trace(layout.ids, point, np.linspace(-30, 30, 11), (side,)):
        return None
    count = int(rng.integers(1, 4))
    radii = rng.uniform(2.5, min(0.45 * point.half, 7.0), count)
    gaps = rng.uniform(1.5, 5.0, count - 1)
    along = np.concatenate([[0.0], np.cumsum(radii[:-1] + radii[1:] + gaps)])
    along -= along[-1] / 2
    across = side * (point.half + radii * rng.uniform(-0.3, 0.3, count))
    centres = point.at(along, across)

    def draw(image: np.ndarray) -> None:
        for centre, radius in zip(np.rint(centres).astype(int), radii, strict=True):
            cv2.circle(image, tuple(centre.tolist()), round(radius), BOARD, -1)

    return _Edit(_anchor(centres), draw)


def _plan_spur(layout: _Layout, rng: np.random.Generator) -> _Edit | None:
    """Grow a thin tapered or hooked protrusion from a trace edge into bare board."""
    point = _pick_trace_point(layout, rng, 3, 24)
    if point is None:
        return None
    side = _pick(rng, (-1, 1))
    length = rng.uniform(8.0, 28.0)
    if not _is_plain_trace(layout.ids, point, np.linspace(-10, 10, 5), (side,)):
        return None
    strip = side * np.arange(point.half + 2.0, point.half + length + 10.0)
    strip_along = np.linspace(-20.0, 20.0, 9)[:, None]
    if np.any(_sample(layout.ids, point.at(strip_along, strip[None, :])) != 0):
        return None
    tip = rng.uniform(-0.5, 0.5) * length
    if rng.random() < 0.5:
        base = rng.uniform(3.0, 8.0)
        along = np.array([-base / 2, base / 2, tip + 1, tip - 1])
        across = side * (point.half + np.array([-2.0, -2.0, length, length]))
        polygon = point.at(along, across)
        return _Edit(_anchor(polygon), _fill(polygon, COPPER))
    along = np.array([0.0, rng.uniform(-0.3, 0.3) * length, tip])
    across = side * (point.half + np.array([-2.0, 0.6 * length, length]))
    hook = point.at(along, across)
    return _Edit(_anchor(hook), _polyline(hook, int(rng.integers(2, 5)), COPPER))


def _plan_copper(layout: _Layout, rng: np.random.Generator) -> _Edit | None:
    """Drop an irregular blob of copper on bare board, clear of any feature."""
    centre = _pick_site(layout.bare_sites, rng)
    if centre is None:
        return None
    count = int(rng.integers(5, 10))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, count))
    radii = rng.uniform(4.0, _BLOB_MAX_PX) * rng.uniform(0.45, 1.0, count)
    stretch = np.array([1.0, rng.uniform(0.4, 1.0)])
    turn = rng.uniform(0.0, np.pi)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    offsets = np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    polygon = centre + (offsets * stretch) @ rotation.T
    return _Edit(_anchor(centre), _fill(polygon, COPPER))


def _plan_pin_hole(layout: _Layout, rng: np.random.Generator) -> _Edit | None:
    """Open a small elliptic hole inside copper, away from any edge or drill hole."""
    centre = _pick_site(layout.copper_sites, rng)
    if centre is None:
        return None
    x, y = _anchor(centre)
    axes = tuple(rng.integers(2, _PIN_HOLE_MAX_PX + 1, 2).tolist())
    angle = float(rng.uniform(0.0, 180.0))

    def draw(image: np.ndarray) -> None:
        cv2.ellipse(image, (x, y), axes, angle, 0, 360, BOARD, -1)

    return _Edit((x, y), draw)


# Indexed by class id, in the order of PCB_CLASSES.
_PLANNERS: tuple[Callable[[_Layout, np.random.Generator], _Edit | None], ...] = (
    _plan_open,
    _plan_short,
    _plan_mousebite,
    _plan_spur,
    _plan_copper,
    _plan_pin_hole,
)


def _box_around(
    changed: np.ndarray, origin: tuple[int, int], shape: tuple[int, ...]
) -> tuple[int, int, int, int] | None:
    """Compute the padded xyxy box of the changed pixels.

    Returns None when the box is out of the allowed size range.
    """
    ys, xs = np.nonzero(changed)
    # Pixel indices to xyxy edges: pixel column c spans [c, c + 1).
    box = [
        origin[0] + int(xs.min()) - _BOX_PAD_PX,
        origin[1] + int(ys.min()) - _BOX_PAD_PX,
        origin[0] + int(xs.max()) + 1 + _BOX_PAD_PX,
        origin[1] + int(ys.max()) + 1 + _BOX_PAD_PX,
    ]
    for low, high in ((0, 2), (1, 3)):
        missing = _BOX_MIN_PX - (box[high] - box[low])
        if missing > 0:
            box[low] -= missing // 2
            box[high] += missing - missing // 2
    height, width = shape
    x1, y1 = max(box[0], 0), max(box[1], 0)
    x2, y2 = min(box[2], width), min(box[3], height)
    sides = (x2 - x1, y2 - y1)
    if min(sides) < _BOX_MIN_PX or max(sides) > _BOX_MAX_PX:
        return None
    return x1, y1, x2, y2


def _overlaps(box: tuple[int, int, int, int], other: GroundTruth) -> bool:
    gap = _BOX_GAP_PX
    return (
        box[0] < other.x2 + gap
        and other.x1 < box[2] + gap
        and box[1] < other.y2 + gap
        and other.y1 < box[3] + gap
    )


def _apply_edit(
    image: np.ndarray, edit: _Edit, placed: list[GroundTruth]
) -> tuple[int, int, int, int] | None:
    """Draw the edit and return its box. Undo it when the box is out of the
    size range or overlaps a defect already placed."""
    x, y = edit.anchor
    x0, y0 = max(x - _REACH_PX, 0), max(y - _REACH_PX, 0)
    window = (slice(y0, y + _REACH_PX + 1), slice(x0, x + _REACH_PX + 1))
    before = image[window].copy()
    edit.draw(image)
    changed = image[window] != before
    box = _box_around(changed, (x0, y0), image.shape) if changed.any() else None
    if box is None or any(_overlaps(box, truth) for truth in placed):
        image[window] = before
        return None
    return box


def _place_defect(
    image: np.ndarray,
    layout: _Layout,
    rng: np.random.Generator,
    class_id: int,
    placed: list[GroundTruth],
) -> GroundTruth | None:
    for _ in range(_ATTEMPTS_PER_CLASS):
        edit = _PLANNERS[class_id](layout, rng)
        box = None if edit is None else _apply_edit(image, edit, placed)
        if box is not None:
            return GroundTruth(class_id, PCB_CLASSES[class_id], *map(float, box))
    return None


def _inject_defects(
    image: np.ndarray, layout: _Layout, rng: np.random.Generator, count: int
) -> tuple[GroundTruth, ...]:
    """Add `count` defects to `image`, trying the other classes when a drawn
    class finds no room on this board."""
    placed: list[GroundTruth] = []
    classes = len(PCB_CLASSES)
    for _ in range(count):
        first = int(rng.integers(classes))
        for class_id in [(first + step) % classes for step in range(classes)]:
            truth = _place_defect(image, layout, rng, class_id, placed)
            if truth is not None:
                placed.append(truth)
                break
    return tuple(placed)


# ---------------------------------------------------------------------------
# Public API


def _check_frame_size(width: int, height: int) -> None:
    if width < MIN_SIDE_PX or height < MIN_SIDE_PX:
        raise ValueError(
            f"invalid frame size {width}x{height}: width and height must be "
            f"at least {MIN_SIDE_PX} px"
        )


def render_board(
    seed: int, *, width: int = 640, height: int = 640, defects: int | None = None
) -> SimulatedFrame:
    """Render a board with defects; the same arguments give the same frame.

    `defects` fixes the number of defects (0 to 12). By default 3 to 12 are
    drawn. On frames much smaller than 640x640 fewer may fit, which is logged
    as a warning.
    """
    _check_frame_size(width, height)
    if defects is not None and not 0 <= defects <= MAX_DEFECTS:
        raise ValueError(f"invalid defects={defects}: use 0 to {MAX_DEFECTS} or None")
    rng = np.random.default_rng(seed)
    layout = _draw_layout(rng, width, height)
    count = (
        int(rng.integers(MIN_DEFECTS, MAX_DEFECTS + 1)) if defects is None else defects
    )
    image = layout.image.copy()
    truths = _inject_defects(image, layout, rng, count)
    if len(truths) < count:
        logger.warning(
            "placed %d of %d defects on the %dx%d board of seed %d because no "
            "room was left: use a larger frame or fewer defects",
            len(truths),
            count,
            width,
            height,
            seed,
        )
    return SimulatedFrame(image=image, defects=truths, seed=seed)


def encode_frame(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an image as a camera would send it: JPEG, PNG or BMP bytes."""
    if fmt not in CONTENT_TYPES:
        raise ValueError(
            f"invalid image format {fmt!r}: use one of {sorted(CONTENT_TYPES)}"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"invalid JPEG quality {quality}: use 1 to 100")
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt == "jpeg" else []
    ok, encoded = cv2.imencode(_FILE_SUFFIXES[fmt], image, params)
    if not ok:
        raise ValueError(
            f"cv2.imencode failed on a {image.dtype} image of shape {image.shape}"
        )
    return encoded.tobytes()


def frame_seed(seed: int, line: str, sequence: int) -> int:
    """Derive a frame's render seed from the simulator seed, line and sequence.

    BLAKE2b keeps it stable across processes, unlike the salted built-in hash().
    """
    digest = hashlib.blake2b(
        f"{seed}/{line}/{sequence}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


class LineSimulator:
    """Endless frames of one simulated line, from its cameras in round robin.

    The simulator is its own iterator: iterating or calling take() continues
    from the last sequence number handed out, and `shot(sequence)` re-renders
    any earlier shot.
    """

    def __init__(
        self,
        line: str,
        cameras: int = 2,
        seed: int = 0,
        width: int = 640,
        height: int = 640,
        *,
        fmt: str = "jpeg",
    ) -> None:
        if not line:
            raise ValueError(
                "invalid line id '': use a non-empty name such as 'line-1'"
            )
        if cameras < 1:
            raise ValueError(
                f"invalid cameras={cameras}: a line needs at least 1 camera"
            )
        if fmt not in CONTENT_TYPES:
            raise ValueError(
                f"invalid image format {fmt!r}: use one of {sorted(CONTENT_TYPES)}"
            )
        _check_frame_size(width, height)
        self.line = line
        self.camera_ids = tuple(f"cam-{index}" for index in range(1, cameras + 1))
        self.seed = seed
        self.width = width
        self.height = height
        self.fmt = fmt
        self._next_sequence = 0

    def shot(self, sequence: int) -> SimulatedShot:
        """Render the shot with this sequence number."""
        frame = render_board(
            frame_seed(self.seed, self.line, sequence),
            width=self.width,
            height=self.height,
        )
        return SimulatedShot(
            camera_id=self.camera_ids[sequence % len(self.camera_ids)],
            sequence=sequence,
            frame=frame,
            payload=encode_frame(frame.image, self.fmt),
            content_type=CONTENT_TYPES[self.fmt],
        )

    def __iter__(self) -> Iterator[SimulatedShot]:
        return self

    def __next__(self) -> SimulatedShot:
        shot = self.shot(self._next_sequence)
        self._next_sequence += 1
        return shot

    def take(self, count: int) -> list[SimulatedShot]:
        """Return the next `count` shots."""
        return [next(self) for _ in range(count)]


def to_yolo_labels(frame: SimulatedFrame) -> str:
    """Format the frame's defects as YOLO label lines: `class cx cy w h`, normalised."""
    height, width = frame.image.shape[:2]
    lines = []
    for truth in frame.defects:
        # xyxy pixels to centre x, centre y, width, height as fractions of the image.
        cx = (truth.x1 + truth.x2) / 2 / width
        cy = (truth.y1 + truth.y2) / 2 / height
        w = (truth.x2 - truth.x1) / width
        h = (truth.y2 - truth.y1) / height
        lines.append(f"{truth.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def write_dataset(folder: Path, count: int, seed: int = 0) -> Path:
    """Write `count` simulated frames as a YOLO data set laid out like DeepPCB's.

    The last tenth of the frames (at least one) goes to val, the rest to train.
    Returns the path of data.yaml.
    """
    if count < 2:
        raise ValueError(f"invalid count={count}: a data set needs at least 2 frames")
    folder = Path(folder)
    val_count = max(1, round(count / 10))
    for index in range(count):
        split = "train" if index < count - val_count else "val"
        frame = render_board(frame_seed(seed, "dataset", index))
        _write_sample(folder, split, f"{index:06d}", frame)
    names = "".join(
        f"  {class_id}: {name}\n" for class_id, name in enumerate(PCB_CLASSES)
    )
    yaml_path = folder / "data.yaml"
    yaml_path.write_text(f"train: images/train\nval: images/val\nnames:\n{names}")
    return yaml_path


def _write_sample(folder: Path, split: str, stem: str, frame: SimulatedFrame) -> None:
    images = folder / "images" / split
    labels = folder / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (images / f"{stem}.jpg").write_bytes(encode_frame(frame.image, "jpeg"))
    (labels / f"{stem}.txt").write_text(to_yolo_labels(frame))

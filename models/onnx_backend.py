"""YOLOv8 detection on ONNX Runtime, equal to the Ultralytics torch backend.

The graph comes from ``faultline export`` (``models/export.py``). Pre- and
post-processing here re-implement what Ultralytics 8.4.190 does around the
same graph in ``predict`` with ``rect=False``, so both backends return the
same detections up to float rounding:

- ``LetterBox`` in ``ultralytics/data/augment.py``: scale by
  ``min(size / h, size / w)``, round each side, resize with
  ``cv2.INTER_LINEAR``, pad with 114 on both sides (centred).
- ``non_max_suppression`` in ``ultralytics/utils/nms.py`` with
  ``agnostic=False`` and ``multi_label=False``: best class per anchor, keep
  scores strictly above ``conf``, at most 30000 candidates, class-wise greedy
  NMS that drops boxes with IoU strictly above ``iou``, at most ``max_det``.
- ``scale_boxes`` in ``ultralytics/utils/ops.py``: remove the padding,
  divide by each axis's own gain, clip to the source image.

Each image is letterboxed to the same ``imgsz`` square on its own, so its
detections do not depend on what else shares the batch.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.detector import to_bgr
from pipeline.errors import ConfigError, DependencyError
from schemas import Detection

log = logging.getLogger(__name__)

PAD_VALUE = 114
# Ultralytics shifts each class's boxes by class id * MAX_WH pixels, so one
# NMS pass never compares boxes of different classes.
MAX_WH = 7680
MAX_NMS_CANDIDATES = 30000


@dataclass(frozen=True)
class Letterbox:
    """Size and offset of a source image inside its letterboxed square."""

    source_height: int
    source_width: int
    resized_height: int
    resized_width: int
    top: int
    left: int


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize a (H, W, 3) image to fit a ``size`` square and pad it centred."""
    import cv2

    height, width = image.shape[:2]
    ratio = min(size / height, size / width)
    resized_width = max(round(width * ratio), 1)
    resized_height = max(round(height * ratio), 1)
    pad_x = (size - resized_width) / 2
    pad_y = (size - resized_height) / 2
    # The same rounding as Ultralytics: an odd padding puts the extra pixel
    # at the bottom and right.
    top, bottom = round(pad_y - 0.1), round(pad_y + 0.1)
    left, right = round(pad_x - 0.1), round(pad_x + 0.1)
    if (width, height) != (resized_width, resized_height):
        image = cv2.resize(
            image, (resized_width, resized_height), interpolation=cv2.INTER_LINEAR
        )
    padded = cv2.copyMakeBorder(
        image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3
    )
    geometry = Letterbox(height, width, resized_height, resized_width, top, left)
    return padded, geometry


def to_input_batch(squares: Sequence[np.ndarray]) -> np.ndarray:
    """Stack letterboxed BGR uint8 squares into the graph's float32 input."""
    batch = np.stack(squares)
    # (N, H, W, 3) BGR uint8 to (N, 3, H, W) RGB float32 in 0..1.
    batch = batch[..., ::-1].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32) / np.float32(255)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Convert boxes from centre x, centre y, width, height to corners."""
    # (cx, cy, w, h) to (x1, y1, x2, y2), in the same pixels.
    half = boxes[:, 2:] / 2
    return np.concatenate((boxes[:, :2] - half, boxes[:, :2] + half), axis=1)


def greedy_nms(
    boxes: np.ndarray, scores: np.ndarray, iou: float, limit: int
) -> np.ndarray:
    """Return the kept indices in descending score order, at most ``limit``.

    A box is dropped when its IoU with a kept, higher-scoring box is strictly
    above ``iou``; areas have no +1 term. This is torchvision's ``nms``,
    which Ultralytics calls.
    """
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < limit:
        best = order[0]
        keep.append(int(best))
        rest = order[1:]
        width = np.maximum(
            0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest])
        )
        height = np.maximum(
            0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])
        )
        inter = width * height
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def select_detections(
    prediction: np.ndarray, conf: float, iou: float, max_det: int
) -> np.ndarray:
    """Turn one image's head output into rows of x1 y1 x2 y2 score class.

    ``prediction`` is (4 + classes, anchors): cx cy w h in letterboxed pixels
    followed by one sigmoid score per class. Rows come back in descending
    score order, boxes still in letterboxed pixels.
    """
    # (4 + classes, anchors) to (anchors, 4 + classes).
    rows = prediction.T
    rows = rows[rows[:, 4:].max(axis=1) > conf]
    if not rows.shape[0]:
        return np.zeros((0, 6), dtype=np.float32)
    boxes = xywh_to_xyxy(rows[:, :4])
    class_ids = rows[:, 4:].argmax(axis=1)
    scores = rows[:, 4:].max(axis=1)
    if scores.shape[0] > MAX_NMS_CANDIDATES:
        top = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
        boxes, scores, class_ids = boxes[top], scores[top], class_ids[top]
    offsets = class_ids.astype(np.float32)[:, None] * np.float32(MAX_WH)
    keep = greedy_nms(boxes + offsets, scores, iou, max_det)
    return np.concatenate(
        (boxes[keep], scores[keep, None], class_ids[keep, None].astype(np.float32)),
        axis=1,
    )


def scale_to_source(boxes: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """Map xyxy boxes from the letterboxed square back to source pixels."""
    # Letterboxed square pixels to source pixels: remove the padding, undo
    # each axis's own resize gain, clip to the image.
    gain_x = geometry.resized_width / geometry.source_width
    gain_y = geometry.resized_height / geometry.source_height
    scaled = boxes.copy()
    scaled[:, [0, 2]] = (scaled[:, [0, 2]] - geometry.left) / np.float32(gain_x)
    scaled[:, [1, 3]] = (scaled[:, [1, 3]] - geometry.top) / np.float32(gain_y)
    scaled[:, [0, 2]] = scaled[:, [0, 2]].clip(0, geometry.source_width)
    scaled[:, [1, 3]] = scaled[:, [1, 3]].clip(0, geometry.source_height)
    return scaled


Provider = str | tuple[str, dict[str, str]]


def pick_providers(
    requested: str, available: Sequence[str]
) -> tuple[list[Provider], str]:
    """Return the ONNX Runtime providers and the device name for ``requested``.

    ``requested`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    has_cuda = "CUDAExecutionProvider" in available
    if requested == "auto":
        requested = "cuda" if has_cuda else "cpu"
    if requested == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    index = requested.removeprefix("cuda").removeprefix(":") or "0"
    if not requested.startswith("cuda") or not index.isdigit():
        raise ConfigError(f"device {requested!r} is invalid; use auto, cpu or cuda")
    if not has_cuda:
        raise ConfigError(
            f"device {requested!r} requested but onnxruntime offers no "
            f"CUDAExecutionProvider (available: {', '.join(available)}); install "
            "onnxruntime-gpu or set FAULTLINE_DEVICE=auto or cpu"
        )
    cuda = ("CUDAExecutionProvider", {"device_id": index})
    return [cuda, "CPUExecutionProvider"], f"cuda:{index}"


class OnnxDetector:
    """A YOLOv8 detect graph exported by ``faultline export``, on ONNX Runtime.

    One instance per process, called from one inference thread, like the
    torch backend.
    """

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        classes: Sequence[str],
        imgsz: int = 640,
        conf: float = 0.25,
        iou: float = 0.7,
        device: str = "auto",
        max_detections: int = 300,
        cpu_threads: int | None = None,
    ) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise DependencyError(
                "the onnx backend needs onnxruntime; install the project's 'onnx' "
                "extra (pip install 'onnxruntime>=1.18') or set backend: torch in "
                "the model registry"
            ) from None
        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(
                f"ONNX model {str(path)!r} not found; create it with "
                "`faultline export --model NAME` or fix the 'onnx' path in the registry"
            )

        self.name = name
        self.version = version
        self.classes = tuple(classes)
        self.imgsz = imgsz
        self.conf = conf
        self.iou = iou
        self.max_detections = max_detections

        providers, self.device = pick_providers(
            device, onnxruntime.get_available_providers()
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = cpu_threads or os.cpu_count() or 1
        options.graph_optimization_level = (
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        )
        self._session = onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=providers
        )

        if self.device != "cpu" and "CUDAExecutionProvider" not in (
            self._session.get_providers()
        ):
            # onnxruntime falls back to the CPU when the CUDA libraries fail
            # to load, and only logs it.
            log.warning(
                "model %s runs on the CPU: onnxruntime could not start CUDA for %s",
                name,
                self.device,
            )
            self.device = "cpu"
        self._input = self._session.get_inputs()[0]
        self._output_name = self._session.get_outputs()[0].name
        self._max_batch = self._check_graph(path)
        log.info(
            "model %s %s loaded from %s on %s (onnxruntime %s, providers %s)",
            name,
            version,
            path,
            self.device,
            onnxruntime.__version__,
            self._session.get_providers(),
        )

    def _check_graph(self, path: Path) -> int | None:
        """Check the graph against the registry; return its fixed batch size, if any."""
        batch, channels, height, width = self._input.shape
        if channels != 3:
            raise ConfigError(
                f"ONNX model {path} takes {channels} channels; expected 3"
            )
        for side in (height, width):
            if isinstance(side, int) and side != self.imgsz:
                raise ConfigError(
                    f"ONNX model {path} has a fixed input of {height}x{width} but the "
                    f"registry sets imgsz {self.imgsz}; re-export it with "
                    f"`faultline export` or set imgsz: {side}"
                )
        metadata = self._session.get_modelmeta().custom_metadata_map
        if "names" in metadata:
            names = ast.literal_eval(metadata["names"])
            exported = tuple(names[i] for i in sorted(names))
            if exported != self.classes:
                raise ConfigError(
                    f"ONNX model {path} was exported with classes {list(exported)} but "
                    f"the registry lists {list(self.classes)}; re-export the model or "
                    "fix 'classes' in the registry"
                )
        return batch if isinstance(batch, int) else None

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        if not images:
            return []
        boxed = [letterbox(to_bgr(image), self.imgsz) for image in images]
        step = self._max_batch or len(boxed)
        outputs = []
        for start in range(0, len(boxed), step):
            chunk = to_input_batch(
                [square for square, _ in boxed[start : start + step]]
            )
            (output,) = self._session.run(
                [self._output_name], {self._input.name: chunk}
            )
            outputs.extend(output)
        return [
            self._detections(prediction, geometry)
            for prediction, (_, geometry) in zip(outputs, boxed, strict=True)
        ]

    def _detections(
        self, prediction: np.ndarray, geometry: Letterbox
    ) -> list[Detection]:
        rows = select_detections(prediction, self.conf, self.iou, self.max_detections)
        if not rows.shape[0]:
            return []
        boxes = scale_to_source(rows[:, :4], geometry)
        return [
            Detection(
                class_id=int(class_id),
                class_name=self.classes[int(class_id)],
                confidence=float(score),
                x1=float(box[0]),
                y1=float(box[1]),
                x2=float(box[2]),
                y2=float(box[3]),
            )
            for box, score, class_id in zip(boxes, rows[:, 4], rows[:, 5], strict=True)
        ]

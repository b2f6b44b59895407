"""Ultralytics YOLO on torch, loaded from a local weights file only.

One instance per process: a YOLO object is not safe to share across threads,
because ``predict`` rewrites the shared predictor's arguments outside its
lock. Workers call ``predict`` from a single inference thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models import offline
from models.detector import to_bgr
from schemas import Detection

log = logging.getLogger(__name__)


def pick_device(requested: str) -> str:
    """Map ``auto`` to ``cuda:0`` when torch finds a GPU, else ``cpu``."""
    import torch

    if requested == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from pipeline.errors import ConfigError

        raise ConfigError(
            f"device {requested!r} requested but torch sees no CUDA device; "
            "set FAULTLINE_DEVICE=auto or cpu"
        )
    return requested


class UltralyticsDetector:
    def __init__(
        self,
        weights: Path,
        *,
        name: str,
        version: str,
        imgsz: int = 640,
        conf: float = 0.25,
        iou: float = 0.7,
        device: str = "auto",
        max_detections: int = 300,
    ) -> None:
        offline.prepare()
        from ultralytics import YOLO

        path = offline.resolve_weights(weights)
        self.name = name
        self.version = version
        self.imgsz = imgsz
        self.conf = conf
        self.iou = iou
        self.max_detections = max_detections
        self.device = pick_device(device)
        self.half = self.device.startswith("cuda")
        self._model = YOLO(str(path), task="detect")
        self.classes = tuple(self._model.names[i] for i in sorted(self._model.names))
        log.info(
            "model %s %s loaded from %s on %s (half=%s)",
            name, version, path, self.device, self.half,
        )

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        if not images:
            return []
        batch = [to_bgr(image) for image in images]
        # rect=False letterboxes every image to the same imgsz square, so an
        # image's boxes do not depend on what else shares its batch.
        results = self._model.predict(
            batch,
            imgsz=self.imgsz,
            conf=self.conf,
            iou=self.iou,
            device=self.device,
            quantize="fp16" if self.half else None,
            max_det=self.max_detections,
            rect=False,
            batch=len(batch),
            verbose=False,
        )
        return [self._detections(result) for result in results]

    def _detections(self, result) -> list[Detection]:  # type: ignore[no-untyped-def]
        boxes = result.boxes
        if boxes is None or len(boxes) == 0:
            return []
        # Ultralytics has already scaled xyxy from the letterboxed square back
        # to the source image's pixels.
        xyxy = boxes.xyxy.float().cpu().numpy()
        scores = boxes.conf.float().cpu().numpy()
        class_ids = boxes.cls.int().cpu().numpy()
        return [
            Detection(
                class_id=int(c),
                class_name=self.classes[int(c)],
                confidence=float(s),
                x1=float(b[0]),
                y1=float(b[1]),
                x2=float(b[2]),
                y2=float(b[3]),
            )
            for b, s, c in zip(xyxy, scores, class_ids, strict=True)
        ]

"""The detector interface: a batch of decoded images in, detections out.

Images are numpy arrays as OpenCV decodes them: (H, W) for 8-bit mono or
(H, W, 3) BGR for colour. Every backend returns boxes in each image's own
pixels (x1 y1 x2 y2), whatever the batch mixes in sizes and channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from schemas import Detection


class Detector(Protocol):
    name: str
    version: str
    classes: tuple[str, ...]
    device: str

    def predict(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Run one forward pass over ``images``; return detections per image."""
        ...


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Return a (H, W, 3) uint8 BGR view of a mono or colour image."""
    import cv2

    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"image shape {image.shape} is not (H, W) mono or (H, W, 3) BGR")

"""The model registry: which weights a worker loads and how it judges a frame.

The registry is a YAML file (``models/registry.yaml`` by default)::

    default: pcb-yolov8p
    models:
      pcb-yolov8p:
        version: "1"
        backend: torch            # torch | onnx
        weights: weights/pcb-yolov8p.pt   # relative to the registry file
        onnx: weights/pcb-yolov8p.onnx    # used when backend is onnx
        classes: [open, short, mousebite, spur, copper, pin-hole]
        imgsz: 640
        conf: 0.25                # detections below are dropped
        iou: 0.7                  # NMS IoU threshold
        fail_on: {"*": 0.25}      # class name or "*" -> min confidence that fails a frame

A class mapped to ``null`` in ``fail_on`` never fails a frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError
from schemas import Detection

Backend = Literal["torch", "onnx"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    backend: Backend
    weights: Path
    classes: tuple[str, ...]
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.7
    onnx: Path | None = None
    fail_on: dict[str, float | None] = field(default_factory=lambda: {"*": 0.25})
    card: Path | None = None

    def verdict(self, detections: Iterable[Detection]) -> Literal["pass", "fail"]:
        """``fail`` when any detection meets its class's threshold."""
        default = self.fail_on.get("*")
        for detection in detections:
            threshold = self.fail_on.get(detection.class_name, default)
            if threshold is not None and detection.confidence >= threshold:
                return "fail"
        return "pass"


def _resolve(base: Path, value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _spec(name: str, body: dict[str, Any], base: Path, source: Path) -> ModelSpec:
    where = f"model {name!r} in {source}"
    try:
        backend = body.get("backend", "torch")
        if backend not in ("torch", "onnx"):
            raise ConfigError(f"{where}: backend {backend!r} is invalid; use torch or onnx")
        weights = _resolve(base, body["weights"])
        fail_on = body.get("fail_on", {"*": 0.25})
        if not isinstance(fail_on, dict):
            raise ConfigError(f"{where}: fail_on must map class names or '*' to a confidence")
        classes = tuple(str(c) for c in body["classes"])
        unknown = set(fail_on) - set(classes) - {"*"}
        if unknown:
            raise ConfigError(f"{where}: fail_on names unknown classes {sorted(unknown)}")
        return ModelSpec(
            name=name,
            version=str(body["version"]),
            backend=backend,
            weights=weights,  # type: ignore[arg-type]
            classes=classes,
            imgsz=int(body.get("imgsz", 640)),
            conf=float(body.get("conf", 0.25)),
            iou=float(body.get("iou", 0.7)),
            onnx=_resolve(base, body.get("onnx")),
            fail_on={k: (None if v is None else float(v)) for k, v in fail_on.items()},
            card=_resolve(base, body.get("card")),
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: required key {exc.args[0]!r} is missing") from None


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()
        if not self.path.is_file():
            raise ConfigError(
                f"model registry {str(path)!r} not found; set FAULTLINE_MODEL_REGISTRY "
                "to a registry YAML"
            )
        document = yaml.safe_load(self.path.read_text()) or {}
        models = document.get("models") or {}
        base = self.path.parent
        self.models = {name: _spec(name, body, base, self.path) for name, body in models.items()}
        self.default = document.get("default", "")

    def get(self, name: str | None = None) -> ModelSpec:
        key = name or self.default
        try:
            return self.models[key]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise ConfigError(
                f"model {key!r} is not in the registry {self.path} (known: {known}); "
                "set FAULTLINE_MODEL or add it to the registry"
            ) from None


def load_detector(spec: ModelSpec, device: str = "auto"):  # type: ignore[no-untyped-def]
    """Create the backend named by ``spec``; loads torch or onnxruntime lazily."""
    if spec.backend == "onnx":
        from models.onnx_backend import OnnxDetector

        if spec.onnx is None:
            raise ConfigError(f"model {spec.name!r} has backend onnx but no 'onnx' path")
        return OnnxDetector(
            spec.onnx, name=spec.name, version=spec.version, classes=spec.classes,
            imgsz=spec.imgsz, conf=spec.conf, iou=spec.iou, device=device,
        )
    from models.ultralytics_backend import UltralyticsDetector

    return UltralyticsDetector(
        spec.weights, name=spec.name, version=spec.version, imgsz=spec.imgsz,
        conf=spec.conf, iou=spec.iou, device=device,
    )

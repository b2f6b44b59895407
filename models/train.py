"""Reproducible, offline training wrapper around Ultralytics YOLO.

Training starts from an architecture yaml (``yolov8n.yaml``, shipped inside
the ultralytics package) or a local weights file; nothing is downloaded.
The run writes ``weights/best.pt`` and ``weights/last.pt`` under ``out`` and a
model card (``card.json``) beside them. An interrupted run resumes from
``last.pt`` with ``resume=True``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import offline
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

# DeepPCB's images are binarised line-scan crops, so colour augmentation has
# nothing to vary and vertical flips are as valid as horizontal ones.
PCB_AUGMENTATION: dict[str, float] = {
    "hsv_h": 0.0,
    "hsv_s": 0.0,
    "hsv_v": 0.0,
    "fliplr": 0.5,
    "flipud": 0.5,
    "degrees": 0.0,
    "scale": 0.25,
    "translate": 0.1,
    "mosaic": 1.0,
}


@dataclass
class TrainConfig:
    data: Path
    model: str = "yolov8n.yaml"
    cpu_threads: int | None = None
    imgsz: int = 640
    epochs: int = 100
    hours: float | None = None
    batch: int = 16
    # Ultralytics accumulates gradients up to a nominal batch of 64 images.
    # On 900 images that is 14 optimizer steps an epoch; stepping every batch
    # gives four times as many updates for the same compute.
    nominal_batch: int = 16
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    out: Path = Path("runs/train")
    resume: bool = False
    augmentation: dict[str, float] = field(default_factory=lambda: dict(PCB_AUGMENTATION))
    data_source: str = ""
    data_licence: str = ""


def _check(config: TrainConfig) -> tuple[Path, str]:
    data = config.data.expanduser().resolve()
    if not data.is_file():
        raise ConfigError(
            f"data yaml {str(config.data)!r} not found; pass the data set's "
            "data.yaml by path (Ultralytics takes its folder as the root)"
        )
    if config.imgsz < 32 or config.imgsz % 32:
        raise ConfigError(f"--imgsz {config.imgsz} is invalid: use a multiple of 32")
    model = config.model
    if model.endswith(".yaml") and Path(model).expanduser().is_file():
        model = str(Path(model).expanduser().resolve())
    elif not model.endswith(".yaml"):
        model = str(offline.resolve_weights(model))
    return data, model


def train(config: TrainConfig) -> Path:
    """Train, validate the best weights and write the model card; return its path."""
    offline.prepare(cpu_threads=config.cpu_threads)
    data, model_source = _check(config)
    out = config.out.expanduser().resolve()
    from ultralytics import YOLO

    last = out / "weights" / "last.pt"
    if config.resume and last.is_file():
        log.info("resuming training from %s", last)
        yolo = YOLO(str(last))
        yolo.train(resume=True)
    else:
        yolo = YOLO(model_source)
        extra: dict[str, Any] = {"time": config.hours} if config.hours else {}
        log.info("training %s on %s at imgsz %d", model_source, data, config.imgsz)
        yolo.train(
            data=str(data),
            imgsz=config.imgsz,
            epochs=config.epochs,
            batch=config.batch,
            nbs=config.nominal_batch,
            workers=config.workers,
            seed=config.seed,
            deterministic=True,
            device=config.device,
            project=str(out.parent),
            name=out.name,
            exist_ok=True,
            pretrained=False,
            plots=False,
            cache="ram",
            amp=False,
            **config.augmentation,
            **extra,
        )
    best = out / "weights" / "best.pt"
    return write_card(best, config, data, model_source)


def validate(weights: Path, data: Path, imgsz: int, device: str = "cpu") -> dict[str, Any]:
    """Run Ultralytics ``val`` and return overall and per-class metrics."""
    offline.prepare()
    from ultralytics import YOLO

    yolo = YOLO(str(weights))
    metrics = yolo.val(data=str(data), imgsz=imgsz, device=device, plots=False, verbose=False)
    names = yolo.names
    per_class = {}
    for index, class_id in enumerate(metrics.box.ap_class_index):
        per_class[names[int(class_id)]] = {
            "precision": round(float(metrics.box.p[index]), 4),
            "recall": round(float(metrics.box.r[index]), 4),
            "map50": round(float(metrics.box.ap50[index]), 4),
            "map50_95": round(float(metrics.box.ap[index]), 4),
        }
    return {
        "map50": round(float(metrics.box.map50), 4),
        "map50_95": round(float(metrics.box.map), 4),
        "precision": round(float(metrics.box.mp), 4),
        "recall": round(float(metrics.box.mr), 4),
        "per_class": per_class,
    }


def write_card(weights: Path, config: TrainConfig, data: Path, source: str) -> Path:
    """Validate ``weights`` and write ``card.json`` beside them."""
    import torch
    import ultralytics

    checkpoint = torch.load(weights, map_location="cpu", weights_only=False)
    epochs_run = int(checkpoint.get("epoch", -1)) + 1 if checkpoint.get("epoch", -1) >= 0 else None
    metrics = validate(weights, data, config.imgsz, config.device)
    names = checkpoint["model"].names if hasattr(checkpoint.get("model"), "names") else {}
    card = {
        "architecture": Path(source).stem if source.endswith(".yaml") else source,
        "weights": weights.name,
        "classes": {int(k): v for k, v in dict(names).items()},
        "imgsz": config.imgsz,
        "data": {
            "yaml": str(data),
            "source": config.data_source,
            "licence": config.data_licence,
        },
        "epochs_requested": config.epochs,
        "hours_limit": config.hours,
        "epochs_completed": epochs_run,
        "seed": config.seed,
        "batch": config.batch,
        "nominal_batch": config.nominal_batch,
        "augmentation": config.augmentation,
        "val_metrics": metrics,
        "trained_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "software": {
            "ultralytics": ultralytics.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "device": config.device,
    }
    card_path = weights.parent.parent / "card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log.info("model card written to %s (val mAP50 %.4f)", card_path, metrics["map50"])
    return card_path

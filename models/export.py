"""Export YOLO weights to ONNX for the ONNX Runtime backend, offline.

The export runs Ultralytics' own ONNX exporter on the CPU in a scratch
folder, so an ``.onnx`` file beside the weights is never overwritten by
accident. It then loads the result in ONNX Runtime and runs one batch of two
images before it moves the file to ``out``. The graph takes ``images`` (N, 3, H, W)
float32 RGB in 0..1 with dynamic N, H and W, and returns ``output0``
(N, 4 + classes, anchors).

Ultralytics pip-installs missing export packages unless ``YOLO_AUTOINSTALL``
is off. ``offline.prepare()`` turns it off, and this module checks the
packages itself first, so a missing one raises ``DependencyError`` naming it
instead of a pip run or a network call.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from models import offline
from pipeline.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)

# Opset 17 has every operator of the YOLOv8 detect graph. Ultralytics
# 8.4.190 would pick 18 for torch 2.15; one lower leaves room for older
# onnxruntime builds on line PCs. The smoke run after the export proves that
# the installed onnxruntime runs the file.
DEFAULT_OPSET = 17

# The version ranges Ultralytics 8.4.190's ONNX exporter checks for
# (ultralytics/engine/exporter.py, export_onnx); onnxruntime is also needed
# for the smoke run after the export.
REQUIRED = {"onnx": ">=1.12.0,<2.0.0", "onnxruntime": ""}
REQUIRED_FOR_SIMPLIFY = {"onnxslim": ">=0.1.82"}


@dataclass(frozen=True)
class ExportConfig:
    weights: Path
    out: Path
    imgsz: int = 640
    opset: int = DEFAULT_OPSET
    simplify: bool = True
    dynamic: bool = True


def check_export_dependencies(simplify: bool = True) -> None:
    """Raise DependencyError unless every package the export needs is installed."""
    from ultralytics.utils.checks import check_version

    required = dict(REQUIRED) | (REQUIRED_FOR_SIMPLIFY if simplify else {})
    problems = []
    for package, versions in required.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed")
            continue
        if versions and not check_version(installed, versions):
            problems.append(
                f"{package} {installed} is installed but {versions} is required"
            )
    if problems:
        wanted = " ".join(f"'{name}{versions}'" for name, versions in required.items())
        raise DependencyError(
            f"ONNX export needs packages that are missing: {'; '.join(problems)}. "
            f"Install them with: pip install {wanted} (the project's 'onnx' extra). "
            "The export never installs packages itself."
        )


def export_onnx(config: ExportConfig) -> Path:
    """Export ``config.weights`` to ``config.out`` and return the ONNX path."""
    offline.prepare()
    if config.imgsz < 32 or config.imgsz % 32:
        raise ConfigError(f"--imgsz {config.imgsz} is invalid: use a multiple of 32")
    if config.out.suffix != ".onnx":
        raise ConfigError(
            f"--out {str(config.out)!r} is invalid: the file name must end in .onnx"
        )
    weights = offline.resolve_weights(config.weights)
    if weights.suffix != ".pt":
        raise ConfigError(
            f"weights {str(weights)!r} are not a .pt file; export needs torch weights"
        )
    check_export_dependencies(config.simplify)

    from ultralytics import YOLO

    out = config.out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="faultline-export-") as scratch:
        # Ultralytics writes the .onnx beside the weights it loads, so it
        # loads a copy in the scratch folder.
        source = Path(scratch) / weights.name
        shutil.copyfile(weights, source)
        model = YOLO(str(source), task="detect")
        log.info(
            "exporting %s to ONNX (imgsz %d, opset %d, dynamic=%s, simplify=%s)",
            weights,
            config.imgsz,
            config.opset,
            config.dynamic,
            config.simplify,
        )
        exported = Path(
            model.export(
                format="onnx",
                imgsz=config.imgsz,
                opset=config.opset,
                dynamic=config.dynamic,
                simplify=config.simplify,
                nms=False,
                device="cpu",
                verbose=False,
            )
        )
        _smoke_run(exported, config.imgsz, len(model.names))
        shutil.move(str(exported), out)
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out


def _smoke_run(path: Path, imgsz: int, class_count: int) -> None:
    """Run a batch of two blank images in ONNX Runtime and check the output shape."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    batch = np.zeros((2, 3, imgsz, imgsz), dtype=np.float32)
    (output,) = session.run(["output0"], {"images": batch})
    if output.ndim != 3 or output.shape[0] != 2 or output.shape[1] != 4 + class_count:
        raise ConfigError(
            f"the exported model {path} returned output0 of shape {output.shape}; "
            f"expected (2, {4 + class_count}, anchors) for a YOLO detect head"
        )

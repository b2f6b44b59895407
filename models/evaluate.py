"""Detection metrics of the results stored by the pipeline, next to offline val.

``faultline eval`` checks that the pipeline passes frames to the model
unchanged. It reads the result rows stored in ClickHouse for the frames fed
from one split of a YOLO data set. ``faultline feed --source <split folder>``
sets each frame id to the image file's stem, so eval matches rows back to the
split's label files by frame id and computes precision, recall, mAP50 and
mAP50-95 per class. Next to them it runs Ultralytics' own ``val`` on the same
images with the registry's weights, ``conf``, ``iou`` and ``imgsz``.

Both columns come from the same Ultralytics code. Labels are read by
``verify_image_label``, and detections are matched to labels by ``box_iou``
and ``match_predictions``. The metrics come from ``ap_per_class`` and are
averaged over the classes that have labels, as ``val`` does.

Differences that remain by design (docs/models.md explains them):

- ``val`` runs NMS with ``multi_label=True``: a box whose second class also
  scores above ``conf`` yields a second detection. The pipeline keeps the
  best class only, as ``predict`` does.
- ``val`` matches in letterboxed pixels and does not clip boxes to the image;
  stored boxes are clipped to the source image.
- ``val`` resizes an image whose long side differs from ``imgsz`` with
  ``cv2.INTER_AREA`` and rounds its sides up; ``predict`` uses
  ``cv2.INTER_LINEAR`` and rounds to nearest. Images whose long side equals
  ``imgsz`` (DeepPCB, the simulator) see the same pixels in both.

So eval also runs val a second time with predict's NMS and with boxes
clipped to the image ("matched val"). On images whose long side equals
``imgsz`` the stored results must reproduce its metrics up to float
rounding; any larger difference is distortion by the pipeline.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml

from models import offline
from models.registry import ModelSpec, Registry
from pipeline.errors import ConfigError, FaultlineError, StoreError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

# The frames of a folder source: the suffixes and the order of ingest.feed.
FEED_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# Frame ids per GET /v1/results request. 200 ids keep the query string far
# below the 16 KiB request-head limit of uvicorn's h11 parser.
IDS_PER_REQUEST = 200
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


class EvaluationError(FaultlineError):
    """The stored results cannot be evaluated against the split as asked."""


@dataclass(frozen=True)
class EvalConfig:
    data: Path
    split: str = "val"
    limit: int | None = None
    run_id: str = ""
    batch: int = 16


@dataclass(frozen=True)
class Sample:
    """One image of the split with its labels in source pixels."""

    frame_id: str
    image: Path
    label: Path
    class_ids: np.ndarray  # (M,) float32, as Ultralytics keeps them
    boxes: np.ndarray  # (M, 4) float32 x1 y1 x2 y2 in source pixels


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    labels: int
    precision: float
    recall: float
    map50: float
    map50_95: float


@dataclass(frozen=True)
class Metrics:
    precision: float
    recall: float
    map50: float
    map50_95: float
    classes: tuple[ClassMetrics, ...]


@dataclass(frozen=True)
class EvalReport:
    model: str
    version: str
    weights: str
    conf: float
    iou: float
    imgsz: int
    split: str
    images: int
    labels: int
    stored_detections: int
    pipeline: Metrics
    offline: Metrics
    offline_matched: Metrics

    @property
    def map50_delta(self) -> float:
        return self.pipeline.map50 - self.offline.map50

    def as_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["map50_delta"] = self.map50_delta
        return body


# --- the split -------------------------------------------------------------


def split_folder(data_yaml: Path, split: str) -> tuple[Path, dict[int, str]]:
    """Return the image folder of ``split`` and the class names of ``data_yaml``."""
    data_yaml = data_yaml.expanduser().resolve()
    if not data_yaml.is_file():
        raise ConfigError(
            f"--data {str(data_yaml)!r} not found; pass the data set's data.yaml"
        )
    document = yaml.safe_load(data_yaml.read_text()) or {}
    # Ultralytics takes the folder of data.yaml as the root unless 'path' is set.
    root = Path(document.get("path") or data_yaml.parent).expanduser()
    if not root.is_absolute():
        root = root.resolve()
    entry = document.get(split)
    if not isinstance(entry, str):
        raise ConfigError(
            f"split {split!r} of {data_yaml} is {entry!r}; eval needs one folder of "
            "images per split, as `faultline feed --source` reads"
        )
    folder = Path(entry).expanduser()
    folder = folder if folder.is_absolute() else root / folder
    if not folder.is_dir():
        raise ConfigError(f"split {split!r} of {data_yaml} is not a folder: {folder}")
    names = document.get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise ConfigError(f"{data_yaml} has no 'names' list or mapping of class names")
    return folder, {int(k): str(v) for k, v in names.items()}


def split_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Return the images that ``faultline feed --source folder`` sends, in its order."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} is invalid: use 1 or more images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in FEED_SUFFIXES)
    if not images:
        raise ConfigError(f"{folder} has no .jpg, .jpeg, .png or .bmp files")
    images = images[:limit]
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        twins = sorted({s for s in stems if stems.count(s) > 1})
        raise ConfigError(
            f"{folder} has several images with the same name {twins[:5]}; the frame "
            "id is the file name without suffix, so each must be unique"
        )
    return images


def load_samples(images: Sequence[Path], names: dict[int, str]) -> list[Sample]:
    """Read each image's labels with Ultralytics' own label checks."""
    from ultralytics.data.utils import img2label_paths, verify_image_label

    labels = img2label_paths(images)
    samples = []
    for image, label in zip(images, labels, strict=True):
        # Arguments: image, label, log prefix, keypoint, class count, keypoints,
        # keypoint dims, single class.
        checked = verify_image_label(
            (str(image), label, "", False, len(names), 0, 0, False)
        )
        rows, shape, corrupt, message = checked[1], checked[2], checked[8], checked[9]
        if corrupt:
            raise ConfigError(
                f"Ultralytics rejects this sample, so val would skip it: {message}"
            )
        height, width = shape
        # NOTE: shape is after EXIF rotation, as val reads the image. The
        # pipeline decodes frames without EXIF rotation, so labels of rotated
        # JPEGs do not line up with stored boxes.
        class_ids = rows[:, 0].astype(np.float32)
        # Normalised (cx, cy, w, h) to source pixels (x1, y1, x2, y2).
        scale = np.array([width, height, width, height], dtype=np.float32)
        centre, size = rows[:, 1:3], rows[:, 3:5]
        boxes = np.concatenate((centre - size / 2, centre + size / 2), axis=1) * scale
        samples.append(
            Sample(image.stem, image, Path(label), class_ids, boxes.astype(np.float32))
        )
    return samples


# --- the stored results ----------------------------------------------------


def fetch_stored(
    settings: Settings, frame_ids: Sequence[str], run_id: str = ""
) -> dict[str, dict]:
    """Return the stored rows of ``frame_ids`` by frame id.

    Queries the running store owner (``faultline sink``) over HTTP when it
    owns the chDB path, and opens the store itself otherwise, like
    ``faultline query``.
    """
    from pipeline.api import read_owner

    url = read_owner(settings) if settings.store_url.startswith("chdb://") else None
    if url is None:
        from pipeline.store import ResultStore

        store = ResultStore(settings)
        try:
            return store.results_for(frame_ids, run_id)
        finally:
            store.close()
    import httpx

    rows: dict[str, dict] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for start in range(0, len(frame_ids), IDS_PER_REQUEST):
            chunk = list(frame_ids[start : start + IDS_PER_REQUEST])
            try:
                response = client.get(
                    "/v1/results", params={"frame_id": chunk, "run_id": run_id}
                )
            except httpx.HTTPError as exc:
                raise StoreError(
                    f"request to the store owner at {url} failed: {exc}"
                ) from exc
            if response.status_code != 200:
                raise StoreError(
                    f"the store owner at {url} returned HTTP {response.status_code}: "
                    f"{response.text}"
                )
            rows.update((row["frame_id"], row) for row in response.json()["results"])
    return rows


def _missing_error(
    missing: Sequence[str], total: int, folder: Path, run_id: str
) -> EvaluationError:
    results_kind = f"run {run_id!r}" if run_id else "live results"
    return EvaluationError(
        f"{len(missing)} of {total} frames of {folder} have no stored result in "
        f"{results_kind} (first: {', '.join(missing[:5])}); feed them with "
        f"`faultline feed --line LINE --source {folder}`, wait until the sink "
        "stored them, or pass --limit to evaluate the first frames only"
    )


# --- metrics ---------------------------------------------------------------


def match_detections(
    pred_classes: np.ndarray,
    pred_boxes: np.ndarray,
    true_classes: np.ndarray,
    true_boxes: np.ndarray,
) -> np.ndarray:
    """Return the (N, 10) true-positive matrix of N detections, best score first."""
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import box_iou

    if not len(true_classes) or not len(pred_classes):
        return np.zeros((len(pred_classes), len(IOU_THRESHOLDS)), dtype=bool)
    iou = box_iou(torch.from_numpy(true_boxes), torch.from_numpy(pred_boxes))
    # match_predictions reads nothing of the validator but its IoU thresholds.
    validator = SimpleNamespace(
        iouv=torch.from_numpy(IOU_THRESHOLDS.astype(np.float32))
    )
    correct = BaseValidator.match_predictions(
        validator,  # type: ignore[arg-type]
        torch.from_numpy(pred_classes),
        torch.from_numpy(true_classes),
        iou,
    )
    return correct.numpy()


def stored_predictions(row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return class ids, scores and xyxy boxes of a stored row, best score first."""
    scores = np.asarray(row["confidences"], dtype=np.float32)
    class_ids = np.asarray(row["class_ids"], dtype=np.float32)
    # Four per-coordinate columns to (N, 4) x1 y1 x2 y2 in source pixels.
    boxes = np.stack(
        [np.asarray(row[k], dtype=np.float32) for k in ("x1", "y1", "x2", "y2")], axis=1
    )
    order = np.argsort(-scores, kind="stable")
    return class_ids[order], scores[order], boxes.reshape(-1, 4)[order]


def compute_metrics(
    samples: Iterable[Sample], rows: dict[str, dict], names: dict[int, str]
) -> tuple[Metrics, int]:
    """Return the stored rows' metrics against the labels and their detection count."""
    from ultralytics.utils.metrics import ap_per_class

    tps, scores, pred_classes, true_classes = [], [], [], []
    for sample in samples:
        classes, confidences, boxes = stored_predictions(rows[sample.frame_id])
        tps.append(match_detections(classes, boxes, sample.class_ids, sample.boxes))
        scores.append(confidences)
        pred_classes.append(classes)
        true_classes.append(sample.class_ids)
    results = ap_per_class(
        np.concatenate(tps),
        np.concatenate(scores),
        np.concatenate(pred_classes),
        np.concatenate(true_classes),
        names=names,
    )
    precision, recall, ap, class_index = results[2], results[3], results[5], results[6]
    target = np.concatenate(true_classes).astype(int)
    per_class = tuple(
        ClassMetrics(
            name=names[int(c)],
            labels=int((target == c).sum()),
            precision=float(precision[i]),
            recall=float(recall[i]),
            map50=float(ap[i, 0]),
            map50_95=float(ap[i].mean()),
        )
        for i, c in enumerate(class_index)
    )
    return _mean(per_class), int(sum(len(s) for s in scores))


def _mean(per_class: tuple[ClassMetrics, ...]) -> Metrics:
    """Average over the classes that have labels, as Ultralytics' Metric does."""
    if not per_class:
        return Metrics(0.0, 0.0, 0.0, 0.0, ())
    return Metrics(
        precision=float(np.mean([c.precision for c in per_class])),
        recall=float(np.mean([c.recall for c in per_class])),
        map50=float(np.mean([c.map50 for c in per_class])),
        map50_95=float(np.mean([c.map50_95 for c in per_class])),
        classes=per_class,
    )


# --- offline val -----------------------------------------------------------


def write_subset(
    samples: Sequence[Sample], names: dict[int, str], folder: Path
) -> Path:
    """Write a data set of links to exactly ``samples`` and return its data.yaml.

    Ultralytics writes a labels cache beside the label folder, so val reads
    these links instead of the original folders, which stay untouched.
    """
    images = folder / "images" / "val"
    labels = folder / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for sample in samples:
        os.symlink(sample.image.resolve(), images / sample.image.name)
        if sample.label.is_file():
            os.symlink(sample.label.resolve(), labels / f"{sample.image.stem}.txt")
    data_yaml = folder / "data.yaml"
    document = {
        "path": str(folder),
        "train": "images/val",
        "val": "images/val",
        "names": names,
    }
    data_yaml.write_text(yaml.safe_dump(document, sort_keys=False))
    return data_yaml


def predict_matched_validator() -> type:
    """Return Ultralytics' detection validator changed to treat boxes as predict does.

    NMS keeps the best class per box (``multi_label=False``) and boxes are
    clipped to the image before they are matched to labels, as
    ``scale_boxes`` clips them in predict.
    """
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils import nms

    class PredictMatchedValidator(DetectionValidator):
        def postprocess(self, preds):  # type: ignore[no-untyped-def]
            outputs = nms.non_max_suppression(
                preds,
                self.args.conf,
                self.args.iou,
                multi_label=False,
                agnostic=self.args.single_cls or self.args.agnostic_nms,
                max_det=self.args.max_det,
                end2end=self.end2end,
            )
            return [
                {"bboxes": x[:, :4], "conf": x[:, 4], "cls": x[:, 5], "extra": x[:, 6:]}
                for x in outputs
            ]

        def _process_batch(self, preds, batch):  # type: ignore[no-untyped-def]
            # The source image spans left..left + w * gain_w and
            # top..top + h * gain_h of the letterboxed square.
            (gain_h, gain_w), (left, top) = batch["ratio_pad"]
            height, width = batch["ori_shape"]
            boxes = preds["bboxes"].clone()
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(left, left + width * gain_w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(top, top + height * gain_h)
            return super()._process_batch({**preds, "bboxes": boxes}, batch)

    return PredictMatchedValidator


def offline_val(
    spec: ModelSpec,
    data_yaml: Path,
    names: dict[int, str],
    device: str,
    batch: int,
    validator: type | None = None,
) -> Metrics:
    """Run Ultralytics val of the spec's weights with its conf, iou and imgsz.

    ``validator`` replaces Ultralytics' detection validator class.
    """
    offline.prepare()
    from ultralytics import YOLO

    from models.ultralytics_backend import pick_device

    torch_device = pick_device(device)
    # The torch backend runs fp16 on CUDA, so val does too; ONNX runs fp32.
    fp16 = torch_device.startswith("cuda") and spec.backend == "torch"
    model = YOLO(str(offline.resolve_weights(spec.weights)), task="detect")
    metrics = model.val(
        data=str(data_yaml),
        split="val",
        imgsz=spec.imgsz,
        conf=spec.conf,
        iou=spec.iou,
        batch=batch,
        device=torch_device,
        quantize="fp16" if fp16 else None,
        # rect=False letterboxes to the imgsz square like the pipeline;
        # val's default rect batches pad a 640 px image to 672 px.
        rect=False,
        max_det=300,
        plots=False,
        save_json=False,
        verbose=False,
        workers=0,
        project=str(data_yaml.parent / "runs"),
        name="val",
        exist_ok=True,
        validator=validator,
    )
    box = metrics.box
    counts = metrics.nt_per_class
    per_class = tuple(
        ClassMetrics(
            name=names[int(c)],
            labels=int(counts[int(c)]),
            precision=float(box.p[i]),
            recall=float(box.r[i]),
            map50=float(box.ap50[i]),
            map50_95=float(box.ap[i]),
        )
        for i, c in enumerate(box.ap_class_index)
    )
    return _mean(per_class)


# --- the command -----------------------------------------------------------


def evaluate(settings: Settings, config: EvalConfig) -> EvalReport:
    """Compute the stored results' metrics and offline val's on the same images."""
    offline.prepare()
    spec = Registry(settings.model_registry).get(settings.model)
    folder, names = split_folder(config.data, config.split)
    if tuple(names[i] for i in sorted(names)) != spec.classes:
        raise ConfigError(
            f"{config.data} names the classes {list(names.values())} but model "
            f"{spec.name!r} has {list(spec.classes)}; evaluate the model on its own "
            "data set"
        )
    samples = load_samples(split_images(folder, config.limit), names)

    frame_ids = [s.frame_id for s in samples]
    # NOTE: the stored rows do not say which model produced them here, so
    # eval trusts that the worker ran the model named by --model.
    rows = fetch_stored(settings, frame_ids, config.run_id)
    missing = [frame_id for frame_id in frame_ids if frame_id not in rows]
    if missing:
        raise _missing_error(missing, len(frame_ids), folder, config.run_id)
    pipeline, detections = compute_metrics(samples, rows, names)

    with tempfile.TemporaryDirectory(prefix="faultline-eval-") as scratch:
        data_yaml = write_subset(samples, names, Path(scratch))
        reference = offline_val(spec, data_yaml, names, settings.device, config.batch)
        matched = offline_val(
            spec,
            data_yaml,
            names,
            settings.device,
            config.batch,
            predict_matched_validator(),
        )
    return EvalReport(
        model=spec.name,
        version=spec.version,
        weights=str(spec.weights),
        conf=spec.conf,
        iou=spec.iou,
        imgsz=spec.imgsz,
        split=config.split,
        images=len(samples),
        labels=int(sum(len(s.class_ids) for s in samples)),
        stored_detections=detections,
        pipeline=pipeline,
        offline=reference,
        offline_matched=matched,
    )


def format_report(report: EvalReport) -> str:
    """Render the per-class table: pipeline, offline val and their difference."""
    header = (
        f"model {report.model} {report.version}, split {report.split}: {report.images} "
        f"images, {report.labels} labels, {report.stored_detections} stored "
        "detections\n"
        f"conf {report.conf}, iou {report.iou}, imgsz {report.imgsz}; "
        "pipe = stored results, val = offline Ultralytics val, diff = pipe - val\n"
    )
    metric_names = ("P", "R", "mAP50", "mAP50-95")
    top = f"{'':<14}{'':>7}" + "".join(f"{name:^24}" for name in metric_names)
    sub = f"{'class':<14}{'labels':>7}" + f"{'pipe':>8}{'val':>8}{'diff':>8}" * 4
    lines = [header, top, sub]
    offline_by_name = {c.name: c for c in report.offline.classes}
    for mine in report.pipeline.classes:
        theirs = offline_by_name.get(mine.name)
        lines.append(_row(mine.name, mine.labels, mine, theirs))
    lines.append(_row("all", report.labels, report.pipeline, report.offline))
    lines.append("")
    lines.append("matched val (predict's NMS, boxes clipped to the image):")
    lines.append(_row("all", report.labels, report.pipeline, report.offline_matched))
    return "\n".join(lines)


def _row(name: str, labels: int, mine: Any, theirs: Any) -> str:
    cells = []
    for field in ("precision", "recall", "map50", "map50_95"):
        a = getattr(mine, field)
        b = getattr(theirs, field) if theirs is not None else float("nan")
        cells.append(f"{a:>8.4f}{b:>8.4f}{a - b:>+8.4f}")
    return f"{name:<14}{labels:>7}" + "".join(cells)

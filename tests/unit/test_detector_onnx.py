"""The ONNX Runtime backend against the Ultralytics torch backend.

Tolerances: same detection count and classes, IoU >= 0.99 between twins,
boxes within 1e-2 px, scores within 1e-3.

NMS turns tiny score differences into different boxes where candidates
nearly tie. An early checkpoint may score every anchor about the same, and
an overconfident one may score many anchors within 1e-6 of 1.0. So the
shipped pair is compared on the raw head output of one batch, and on
detections at the registry's threshold unless its scores saturate (that test
then skips and gives the reason). Detections are compared in bulk on a seeded
untrained model, rescaled so its scores and boxes vary from anchor to anchor,
exported by ``faultline export`` like the shipped one. Its thresholds keep
the candidates below about 4000 per batch: with every anchor a candidate,
score differences of 4e-6 between the backends reorder near-ties at the
max_det cut.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from ingest.simulator import PCB_CLASSES, render_board
from models.detector import to_bgr
from models.onnx_backend import (
    OnnxDetector,
    letterbox,
    pick_providers,
    scale_to_source,
    select_detections,
    to_input_batch,
)
from models.registry import Registry, load_detector
from pipeline.errors import ConfigError
from pipeline.settings import DEFAULT_REGISTRY, REPO_ROOT
from schemas import Detection

BOX_TOLERANCE_PX = 1e-2
SCORE_TOLERANCE = 1e-3
MIN_IOU = 0.99
# Near 1.0, float32 steps are 6e-8 apart, and on identical logits the CPU
# Sigmoid of onnxruntime 1.31 differs from torch 2.15's by up to 1.8e-7.
SATURATED_SCORE = 1 - 1e-6
ARCHITECTURE = REPO_ROOT / "models" / "arch" / "pcb-yolov8p.yaml"


def write_random_detector(path: Path, classes: Sequence[str], seed: int = 0) -> Path:
    """Write a seeded, untrained detector whose outputs vary between anchors.

    Fresh weights give nearly constant outputs. One forward pass over two
    simulator boards rescales every convolution to unit output variance, then
    sets the head's last layers so class scores spread over 0..1 and boxes
    stay tens of pixels wide.
    """
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from models import offline

    offline.prepare()
    torch.manual_seed(seed)
    model = DetectionModel(str(ARCHITECTURE), nc=len(classes), verbose=False).eval()
    head = model.model[-1]
    box_layers = {branch[-1] for branch in head.cv2}
    class_layers = {branch[-1] for branch in head.cv3}
    # One bias per distance bin (4 sides x reg_max bins) that favours short
    # distances, so boxes stay small.
    box_bias = -0.3 * torch.arange(head.reg_max, dtype=torch.float32).repeat(4)

    def rescale(layer, inputs, output):  # type: ignore[no-untyped-def]
        target = 1.0
        if layer in class_layers:
            target = 0.3
        elif layer in box_layers:
            target = 0.5
        scale = target / output.std().item()
        layer.weight.mul_(scale)
        output = output * scale
        if layer in class_layers:
            layer.bias.fill_(-2.5)
            return output - 2.5
        if layer in box_layers:
            layer.bias.copy_(box_bias)
            return output + box_bias.view(1, -1, 1, 1)
        return output

    layers = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad
    ]
    boards = [letterbox(to_bgr(render_board(seed + i).image), 640)[0] for i in range(2)]
    with torch.no_grad():
        for layer in layers:
            if layer.bias is not None:
                layer.bias.zero_()
        hooks = [layer.register_forward_hook(rescale) for layer in layers]
        model(torch.from_numpy(to_input_batch(boards)))
        for hook in hooks:
            hook.remove()
    model.names = dict(enumerate(classes))
    torch.save({"model": model, "train_args": {"imgsz": 640}}, path)
    return path


def export(weights: Path, out: Path) -> Path:
    """Export with the CLI in a child process, as an operator would."""
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "export",
        "--weights",
        str(weights),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (
        f"export failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return out


def mixed_frames() -> list[tuple[str, np.ndarray]]:
    """Mono and colour frames of several sizes."""
    frames = []
    for seed in range(6):
        board = render_board(100 + seed).image
        frames.append((f"board {seed} 640x640 mono", board))
    board = render_board(200).image
    frames.append(("800x480 mono", cv2.resize(board, (800, 480))))
    frames.append(
        (
            "333x517 colour",
            cv2.cvtColor(cv2.resize(board, (333, 517)), cv2.COLOR_GRAY2BGR),
        )
    )
    frames.append(
        (
            "1024x768 colour",
            cv2.cvtColor(cv2.resize(board, (1024, 768)), cv2.COLOR_GRAY2BGR),
        )
    )
    return frames


def iou(a: Detection, b: Detection) -> float:
    width = max(0.0, min(a.x2, b.x2) - max(a.x1, b.x1))
    height = max(0.0, min(a.y2, b.y2) - max(a.y1, b.y1))
    inter = width * height
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 1.0


def differences(
    expected: list[Detection], actual: list[Detection]
) -> tuple[list[str], float, float]:
    """Return problems, the max box difference in px and the max score difference."""
    if len(expected) != len(actual):
        return (
            [f"{len(expected)} torch detections but {len(actual)} ONNX ones"],
            0.0,
            0.0,
        )
    problems, max_box, max_score = [], 0.0, 0.0
    unused = list(actual)
    for detection in expected:
        twins = [d for d in unused if d.class_id == detection.class_id]
        if not twins:
            problems.append(f"no ONNX {detection.class_name} detection for {detection}")
            continue
        twin = max(twins, key=lambda d: iou(d, detection))
        unused.remove(twin)
        box = max(
            abs(twin.x1 - detection.x1),
            abs(twin.y1 - detection.y1),
            abs(twin.x2 - detection.x2),
            abs(twin.y2 - detection.y2),
        )
        score = abs(twin.confidence - detection.confidence)
        max_box, max_score = max(max_box, box), max(max_score, score)
        if (
            iou(twin, detection) < MIN_IOU
            or box > BOX_TOLERANCE_PX
            or score > SCORE_TOLERANCE
        ):
            problems.append(f"torch {detection} vs ONNX {twin}")
    return problems, max_box, max_score


def assert_backends_agree(torch_detector, onnx_detector, frames) -> int:  # type: ignore[no-untyped-def]
    """Assert per-frame agreement on one mixed batch; return the detection count."""
    images = [image for _, image in frames]
    expected = torch_detector.predict(images)
    actual = onnx_detector.predict(images)
    problems, max_box, max_score = [], 0.0, 0.0
    for (name, _), mine, theirs in zip(frames, expected, actual, strict=True):
        found, box, score = differences(mine, theirs)
        problems.extend(f"{name}: {problem}" for problem in found)
        max_box, max_score = max(max_box, box), max(max_score, score)
    assert not problems, (
        f"max differences: box {max_box:.2e} px, score {max_score:.2e}\n"
        + "\n".join(problems[:20])
    )
    return sum(len(d) for d in expected)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("random-detector")
    weights = write_random_detector(folder / "random.pt", PCB_CLASSES)
    return weights, export(weights, folder / "random.onnx")


@pytest.fixture(scope="module")
def shipped():  # type: ignore[no-untyped-def]
    spec = Registry(DEFAULT_REGISTRY).get()
    assert spec.onnx is not None and spec.onnx.is_file(), (
        f"shipped ONNX model missing at {spec.onnx}; "
        f"run `faultline export --model {spec.name}`"
    )
    return spec


def test_letterbox_matches_ultralytics() -> None:
    from ultralytics.data.augment import LetterBox

    reference = LetterBox(640, auto=False, stride=32)
    rng = np.random.default_rng(0)
    for height, width in [
        (640, 640),
        (480, 800),
        (517, 333),
        (768, 1024),
        (641, 639),
        (3, 2000),
    ]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mine, geometry = letterbox(image, 640)
        theirs = reference(image=image)
        assert mine.shape == theirs.shape, f"{height}x{width}"
        assert np.array_equal(mine, theirs), f"{height}x{width}: pixels differ"
        assert (geometry.source_height, geometry.source_width) == (height, width)


def test_postprocess_matches_ultralytics() -> None:
    import torch
    import torchvision  # noqa: F401 - predict imports it, so nms runs torchvision's kernel
    from ultralytics.utils import nms, ops

    rng = np.random.default_rng(1)
    anchors, classes = 8400, len(PCB_CLASSES)
    # Head output layout: (N, 4 + classes, anchors), rows cx cy w h then scores.
    raw = np.empty((2, 4 + classes, anchors), dtype=np.float32)
    # Anchors crowd around 400 objects, so many pairs overlap near the IoU
    # threshold and NMS decisions are tested, not only trivial ones.
    objects = rng.integers(0, 400, (2, anchors))
    centres = rng.uniform(0, 640, (2, 2, 400))
    sizes = rng.uniform(8, 120, (2, 2, 400))
    for image in range(2):
        raw[image, 0:2] = centres[image][:, objects[image]] + rng.normal(
            0, 4, (2, anchors)
        )
        raw[image, 2:4] = sizes[image][:, objects[image]] * rng.uniform(
            0.8, 1.25, (2, anchors)
        )
    raw[:, 4:] = rng.uniform(0, 1, (2, classes, anchors)) ** 12
    # A max_det of all anchors compares every NMS decision; 300 cuts the list.
    cases = [(0.25, 0.7, anchors), (0.05, 0.45, anchors), (0.001, 0.7, 300)]
    for conf, iou_threshold, max_det in cases:
        case = f"conf {conf} iou {iou_threshold} max_det {max_det}"
        theirs = nms.non_max_suppression(
            torch.from_numpy(raw), conf, iou_threshold, max_det=max_det
        )
        for index, source_shape in enumerate([(480, 800), (517, 333)]):
            mine = select_detections(raw[index], conf, iou_threshold, max_det)
            expected = theirs[index].numpy()
            assert mine.shape == expected.shape, case
            assert np.allclose(mine, expected, atol=1e-4), case
            image = np.zeros(source_shape, dtype=np.uint8)
            _, geometry = letterbox(to_bgr(image), 640)
            scaled = ops.scale_boxes(
                (640, 640), torch.from_numpy(expected[:, :4].copy()), source_shape
            )
            boxes = scale_to_source(mine[:, :4], geometry)
            assert np.allclose(boxes, scaled.numpy(), atol=1e-3), case
    assert len(theirs[0]) == 300, "the max_det cut was not exercised"


@pytest.fixture(scope="module")
def shipped_head_outputs(shipped) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Return the torch and the ONNX head output of the shipped model on one batch."""
    import onnxruntime
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    squares = [
        letterbox(to_bgr(image), shipped.imgsz)[0] for _, image in mixed_frames()
    ]
    batch = to_input_batch(squares)
    backend = AutoBackend(
        shipped.weights, device=torch.device("cpu"), fuse=True, verbose=False
    )
    with torch.inference_mode():
        output = backend(torch.from_numpy(batch))
    expected = (output[0] if isinstance(output, list | tuple) else output).numpy()
    session = onnxruntime.InferenceSession(
        str(shipped.onnx), providers=["CPUExecutionProvider"]
    )
    (actual,) = session.run(None, {"images": batch})
    return expected, actual


def test_shipped_head_output_matches_torch(shipped, shipped_head_outputs) -> None:  # type: ignore[no-untyped-def]
    expected, actual = shipped_head_outputs
    assert actual.shape == expected.shape
    box = np.abs(actual[:, :4] - expected[:, :4]).max()
    score = np.abs(actual[:, 4:] - expected[:, 4:]).max()
    stale = (
        "; if the weights changed, re-export with "
        f"`faultline export --model {shipped.name}`"
    )
    assert box <= BOX_TOLERANCE_PX, f"box outputs differ by {box:.2e} px{stale}"
    assert score <= SCORE_TOLERANCE, f"class scores differ by {score:.2e}{stale}"


def test_shipped_detections_match_torch(shipped, shipped_head_outputs) -> None:  # type: ignore[no-untyped-def]
    expected, _ = shipped_head_outputs
    scores = expected[:, 4:].max(axis=1)
    saturated = int((scores > SATURATED_SCORE).sum())
    if saturated:
        pytest.skip(
            f"the shipped checkpoint scores {saturated} anchors above "
            f"{SATURATED_SCORE}: NMS then picks among boxes whose scores differ "
            "in the last float32 bits, which no second runtime reproduces"
        )
    torch_detector = load_detector(replace(shipped, backend="torch"), device="cpu")
    onnx_detector = load_detector(replace(shipped, backend="onnx"), device="cpu")
    assert isinstance(onnx_detector, OnnxDetector)
    assert_backends_agree(torch_detector, onnx_detector, mixed_frames())


@pytest.mark.parametrize("conf", [0.25, 0.5])
def test_random_model_detections_match_torch(random_model, conf: float) -> None:  # type: ignore[no-untyped-def]
    from models.ultralytics_backend import UltralyticsDetector

    weights, onnx_path = random_model
    torch_detector = UltralyticsDetector(
        weights, name="random", version="1", conf=conf, device="cpu"
    )
    onnx_detector = OnnxDetector(
        onnx_path,
        name="random",
        version="1",
        classes=PCB_CLASSES,
        conf=conf,
        device="cpu",
    )
    count = assert_backends_agree(torch_detector, onnx_detector, mixed_frames())
    assert count > 0, "the random model found nothing: nothing was compared"


def test_onnx_rejects_other_classes(shipped) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="classes"):
        OnnxDetector(
            shipped.onnx, name="x", version="1", classes=("a", "b"), device="cpu"
        )


def test_onnx_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="faultline export"):
        OnnxDetector(
            tmp_path / "none.onnx", name="x", version="1", classes=("a",), device="cpu"
        )


def test_providers_cuda_without_gpu() -> None:
    assert pick_providers("auto", ["CPUExecutionProvider"]) == (
        ["CPUExecutionProvider"],
        "cpu",
    )
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        pick_providers("cuda", ["CPUExecutionProvider"])


def test_providers_pick_cuda_device() -> None:
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers, device = pick_providers("auto", available)
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": "0"})
    assert device == "cuda:0"
    providers, device = pick_providers("cuda:1", available)
    assert providers[0] == ("CUDAExecutionProvider", {"device_id": "1"})
    assert device == "cuda:1"
    with pytest.raises(ConfigError, match="invalid"):
        pick_providers("tpu", available)

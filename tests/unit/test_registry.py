from pathlib import Path

import pytest

from models.registry import Registry
from pipeline.errors import ConfigError
from pipeline.settings import DEFAULT_REGISTRY
from schemas import Detection


def write_registry(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(body)
    return path


BASE = """
default: m
models:
  m:
    version: "3"
    weights: w.pt
    classes: [open, short, pin-hole]
"""


def detection(name: str, confidence: float) -> Detection:
    return Detection(0, name, confidence, 0, 0, 1, 1)


def test_shipped_registry_loads() -> None:
    spec = Registry(DEFAULT_REGISTRY).get()
    assert spec.weights.is_absolute()
    assert spec.weights.is_file(), f"shipped weights missing: {spec.weights}"
    assert len(spec.classes) == 6


def test_weights_resolve_beside_registry(tmp_path: Path) -> None:
    spec = Registry(write_registry(tmp_path, BASE)).get("m")
    assert spec.weights == tmp_path / "w.pt"
    assert spec.version == "3"


def test_verdict_any_defect_fails(tmp_path: Path) -> None:
    spec = Registry(write_registry(tmp_path, BASE)).get()
    assert spec.verdict([]) == "pass"
    assert spec.verdict([detection("open", 0.3)]) == "fail"
    assert spec.verdict([detection("open", 0.2)]) == "pass"


def test_verdict_per_class_rule(tmp_path: Path) -> None:
    body = BASE + '    fail_on: {"*": 0.5, pin-hole: null, short: 0.1}\n'
    spec = Registry(write_registry(tmp_path, body)).get()
    assert spec.verdict([detection("pin-hole", 0.99)]) == "pass"
    assert spec.verdict([detection("short", 0.15)]) == "fail"
    assert spec.verdict([detection("open", 0.4)]) == "pass"


def test_unknown_model_named(tmp_path: Path) -> None:
    registry = Registry(write_registry(tmp_path, BASE))
    with pytest.raises(ConfigError, match="'nope' is not in the registry"):
        registry.get("nope")


def test_missing_key_named(tmp_path: Path) -> None:
    body = "models:\n  m:\n    weights: w.pt\n    classes: [a]\n"
    with pytest.raises(ConfigError, match="'version' is missing"):
        Registry(write_registry(tmp_path, body))


def test_fail_on_unknown_class(tmp_path: Path) -> None:
    body = BASE + "    fail_on: {scratch: 0.5}\n"
    with pytest.raises(ConfigError, match="unknown classes"):
        Registry(write_registry(tmp_path, body))


def test_missing_registry_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FAULTLINE_MODEL_REGISTRY"):
        Registry(tmp_path / "absent.yaml")

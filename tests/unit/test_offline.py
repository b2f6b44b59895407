"""Loading the shipped model, predicting and exporting stay off the network.

Each check runs in a child process with a clean environment, so nothing that
this test process imported or set beforehand hides import-time behaviour. A
guard installed before any project import records every call that could
reach the network (socket connect, create_connection, getaddrinfo,
gethostbyname, sendto) and every child process that runs pip or uv, and
makes each of them fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pipeline.errors import DependencyError
from pipeline.settings import REPO_ROOT

GUARD = r"""
import json, socket, subprocess, sys

calls = []

def blocked(name):
    def record_and_raise(*args, **kwargs):
        calls.append(f"{name}{args[1:] if name.startswith('socket.socket') else args}")
        raise OSError(f"network use blocked by the test: {name}")
    return record_and_raise

socket.socket.connect = blocked("socket.socket.connect")
socket.socket.connect_ex = blocked("socket.socket.connect_ex")
socket.socket.sendto = blocked("socket.socket.sendto")
socket.create_connection = blocked("socket.create_connection")
socket.getaddrinfo = blocked("socket.getaddrinfo")
socket.gethostbyname = blocked("socket.gethostbyname")

popen_init = subprocess.Popen.__init__

def guarded_popen(self, args, *rest, **kwargs):
    words = [args] if isinstance(args, str) else [str(a) for a in args]
    if any("pip" in w or w.endswith("uv") for w in words):
        calls.append(f"subprocess {words}")
        raise OSError("package installs blocked by the test")
    popen_init(self, args, *rest, **kwargs)

subprocess.Popen.__init__ = guarded_popen

def report(**extra):
    print("GUARD-REPORT " + json.dumps({"calls": calls, **extra}))
"""

PREDICT = r"""
from dataclasses import replace
import numpy as np
from ingest.simulator import render_board
from models.registry import Registry, load_detector
from pipeline.settings import DEFAULT_REGISTRY

spec = replace(Registry(DEFAULT_REGISTRY).get(), backend=sys.argv[1], conf=0.001)
detector = load_detector(spec, device="cpu")
results = detector.predict([render_board(0).image, np.zeros((480, 800, 3), np.uint8)])
loaded = sys.modules.get("ultralytics.utils")
report(
    detections=sum(len(r) for r in results),
    autoinstall=getattr(loaded, "AUTOINSTALL", None),
    torch_imported="torch" in sys.modules,
)
"""

EXPORT = r"""
from pathlib import Path
from models.export import ExportConfig, export_onnx
from models.registry import Registry
from pipeline.settings import DEFAULT_REGISTRY

spec = Registry(DEFAULT_REGISTRY).get()
out = export_onnx(ExportConfig(weights=spec.weights, out=Path(sys.argv[1])))
import ultralytics.utils
report(size=out.stat().st_size, autoinstall=ultralytics.utils.AUTOINSTALL)
"""


def run_guarded(script: str, args: list[str], home: Path) -> dict:
    """Run ``script`` after the guard in a child with a clean environment."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "FAULTLINE_HOME": str(home / "faultline"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", GUARD + script, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, (
        f"child failed with status {done.returncode}:\n{output[-4000:]}"
    )
    lines = [
        line for line in done.stdout.splitlines() if line.startswith("GUARD-REPORT ")
    ]
    assert lines, f"child printed no report:\n{output[-4000:]}"
    return json.loads(lines[-1].removeprefix("GUARD-REPORT "))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_opens_no_socket(backend: str, tmp_path: Path) -> None:
    result = run_guarded(PREDICT, [backend], tmp_path)
    assert result["calls"] == [], f"network or install attempts: {result['calls']}"
    assert result["detections"] > 0, "no detections at conf 0.001: predict did not run"
    if backend == "torch":
        assert result["autoinstall"] is False
    else:
        assert result["torch_imported"] is False, "the ONNX backend must not need torch"
        assert result["autoinstall"] is None, (
            "the ONNX backend must not import ultralytics"
        )


def test_export_installs_nothing(tmp_path: Path) -> None:
    result = run_guarded(EXPORT, [str(tmp_path / "model.onnx")], tmp_path)
    assert result["calls"] == [], f"network or install attempts: {result['calls']}"
    assert result["autoinstall"] is False
    assert result["size"] > 100_000


def test_export_missing_package_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from models import export

    real_version = metadata.version

    def version(package: str) -> str:
        if package == "onnxslim":
            raise metadata.PackageNotFoundError(package)
        return real_version(package)

    installs = []
    popen_init = subprocess.Popen.__init__

    def guarded_popen(self, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        words = [args] if isinstance(args, str) else [str(a) for a in args]
        if any("pip" in w or w.endswith("uv") for w in words):
            installs.append(words)
            raise OSError("package installs blocked by the test")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(export.metadata, "version", version)
    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_popen)
    config = export.ExportConfig(
        weights=REPO_ROOT / "models" / "weights" / "pcb-yolov8p.pt",
        out=tmp_path / "m.onnx",
    )
    with pytest.raises(DependencyError, match="onnxslim is not installed"):
        export.export_onnx(config)
    assert installs == []
    assert not (tmp_path / "m.onnx").exists()


def test_export_old_package_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import export

    real_version = metadata.version
    monkeypatch.setattr(
        export.metadata,
        "version",
        lambda p: "1.5.0" if p == "onnx" else real_version(p),
    )
    with pytest.raises(
        DependencyError, match=r"onnx 1\.5\.0 is installed but >=1\.12\.0"
    ):
        export.check_export_dependencies()

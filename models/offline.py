"""Keep Ultralytics off the network.

Ultralytics 8.4 reaches for the network in several places: on import it
resolves public DNS names to decide whether it is online, a weights name that
is not an existing path starts a download, train and val fetch ``Arial.ttf``
for plots, and export pip-installs missing packages. ``prepare()`` switches
each of these off and must run before ``ultralytics`` is first imported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import ConfigError

FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")


def default_config_dir() -> Path:
    from pipeline.settings import Settings

    return Settings().home_dir / "ultralytics"


def _bundled_font() -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    return font if font.is_file() else None


def prepare(config_dir: Path | None = None, cpu_threads: int | None = None) -> Path:
    """Set the env vars that keep Ultralytics offline; return its config dir.

    Safe to call many times. It has no effect on settings that an already
    imported ``ultralytics`` read at import time, so call it first.
    ``cpu_threads`` (default: all cores) is the torch thread count on CPU.
    """
    config_dir = (config_dir or default_config_dir()).resolve()
    font_dir = config_dir / "Ultralytics"
    font_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    # Plots in train and val look for Arial in the config dir and download
    # it when absent; any TTF under that name satisfies the lookup.
    font = _bundled_font()
    for name in FONT_NAMES:
        target = font_dir / name
        if font is not None and not target.exists():
            shutil.copyfile(font, target)
    _disable_sync()
    _set_cpu_threads(cpu_threads or os.cpu_count() or 1)
    return config_dir


def _set_cpu_threads(threads: int) -> None:
    # Ultralytics 8.4 resets torch to cpu_count - 1 threads (1 on 2 cores)
    # whenever it selects the CPU device, for training and predict alike.
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = threads


def _disable_sync() -> None:
    """Turn off Ultralytics' analytics events in its settings file."""
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync", False):
        SETTINGS.update(sync=False)


def resolve_weights(path: str | os.PathLike[str]) -> Path:
    """Return an existing absolute weights path or raise ConfigError.

    A bare name such as ``yolov8n.pt`` would make Ultralytics download it, so
    only files that exist are accepted.
    """
    weights = Path(path).expanduser()
    if not weights.is_absolute():
        weights = weights.resolve()
    if not weights.is_file():
        raise ConfigError(
            f"model weights {str(path)!r} not found (looked at {weights}); "
            "pass the path of a local .pt or .onnx file, since weights are "
            "never downloaded"
        )
    return weights

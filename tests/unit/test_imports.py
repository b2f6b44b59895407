"""Edges, schemas and the CLI import without torch, ultralytics or chdb."""

import subprocess
import sys

HEAVY = ("torch", "ultralytics", "chdb", "onnxruntime")


def loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in modules)
        + f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name for name in output.stdout.strip().split(",") if name}


def test_schemas_import_light() -> None:
    assert loaded_after_import(["schemas", "schemas.images"]) == set()


def test_cli_and_feed_import_light() -> None:
    assert loaded_after_import(["pipeline.cli", "ingest.feed", "ingest.simulator"]) == set()


def test_store_api_import_light() -> None:
    assert loaded_after_import(["pipeline.api", "pipeline.sink", "pipeline.store"]) == set()

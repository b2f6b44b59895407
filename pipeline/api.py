"""HTTP API of the process that owns the store: health and analytics queries.

With chDB the store lives inside one process, so that process (``faultline
sink``) runs the sink and answers every query over HTTP; ``faultline query``
and the demo read through it. It writes ``<home>/store-owner.json`` with its
URL and pid while it runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query

from pipeline.errors import ConfigError
from pipeline.settings import Settings
from pipeline.sink import ResultSink
from pipeline.store import ResultStore
from pipeline.topics import validate_line_id

log = logging.getLogger(__name__)

OWNER_FILE = "store-owner.json"


def owner_file(settings: Settings) -> Path:
    return settings.home_dir / OWNER_FILE


def read_owner(settings: Settings) -> str | None:
    """URL of the running store owner, or None when none is running."""
    path = owner_file(settings)
    try:
        body = json.loads(path.read_text())
        os.kill(int(body["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(body["url"])


def create_api(settings: Settings, with_sink: bool = True) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ResultStore(settings)
        state["store"] = store
        sink = ResultSink(settings, store) if with_sink else None
        thread = None
        if sink is not None:
            thread = threading.Thread(target=sink.run, name="sink", daemon=True)
            thread.start()
            state["sink"] = sink
        path = owner_file(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"http://{settings.query_host}:{settings.query_port}"
        path.write_text(json.dumps({"url": url, "pid": os.getpid(), "store": store.url}))
        log.info("store owner serving %s on %s", store.url, url)
        try:
            yield
        finally:
            if sink is not None and thread is not None:
                sink.stop()
                thread.join(timeout=30)
            path.unlink(missing_ok=True)
            store.close()

    app = FastAPI(title="Faultline store", lifespan=lifespan)

    def store() -> ResultStore:
        return state["store"]

    def checked_line(line: str | None) -> str | None:
        if line is None:
            return None
        try:
            return validate_line_id(line)
        except ConfigError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        sink = state.get("sink")
        if sink is not None and not sink.ready.is_set():
            raise HTTPException(status_code=503, detail="sink has no partitions assigned yet")
        return {"status": "ready"}

    @app.get("/v1/summary")
    def summary(line: str | None = None, run_id: str = "") -> dict[str, Any]:
        return store().summary(checked_line(line), run_id).as_dict()

    @app.get("/v1/sink")
    def sink_stats() -> dict[str, Any]:
        sink = state.get("sink")
        if sink is None:
            raise HTTPException(status_code=404, detail="this process runs no sink")
        return dict(sink.stats.__dict__)

    @app.get("/v1/results")
    def results(
        frame_id: list[str] = Query(default_factory=list),
        run_id: str = "",
    ) -> dict[str, Any]:
        if len(frame_id) > 10000:
            raise HTTPException(status_code=422, detail="at most 10000 frame_id values per request")
        return {"results": list(store().results_for(frame_id, run_id).values())}

    return app

"""The results edge: live WebSocket feed, analytics API, frame fetch, dashboard.

With chDB the store lives inside one process, so the process that owns the
chDB path (``faultline serve``, or ``faultline sink``) runs the sink thread
and serves every query over HTTP; ``faultline query`` and the demo read
through it. It writes ``<home>/store-owner.json`` with its URL and pid while
it runs. Against a ClickHouse server, any number of edges can run with
``with_sink=False`` beside one sink.

Every data route needs a token with the ``view`` role for the lines it reads
(``Authorization: Bearer <token>`` or ``?token=``) once tokens are
configured. The dashboard files, ``/metrics``, ``/healthz`` and ``/readyz``
are open. Routes and message formats: docs/results.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Query,
    Request,
    WebSocket,
)
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.websockets import WebSocketDisconnect

from pipeline.auth import AuthError, TokenStore
from pipeline.errors import BrokerError, ConfigError, StoreError
from pipeline.frames import (
    FrameFetcher,
    FrameNotFoundError,
    annotate,
    check_frames_topic,
)
from pipeline.live import (
    BackfillLoader,
    CloseCode,
    HubFullError,
    LiveConsumer,
    LiveFilter,
    LiveHub,
    LiveOptions,
    LiveSession,
    Subscription,
)
from pipeline.metrics import EdgeMetrics
from pipeline.queries import (
    NS_PER_S,
    Backfill,
    ResultQueries,
    TimeRange,
    parse_time_ns,
)
from pipeline.settings import Settings
from pipeline.sink import ResultSink
from pipeline.store import ResultStore
from pipeline.topics import validate_line_id
from schemas import ResultRecord

log = logging.getLogger(__name__)

OWNER_FILE = "store-owner.json"
STATIC_DIR = Path(__file__).resolve().parent / "static"
# /v1/lines lists the lines with results captured within this many seconds.
KNOWN_LINES_WINDOW_S = 24 * 3600
MAX_FRAME_IDS = 10000
# A WebSocket close frame carries at most 123 bytes of reason.
MAX_CLOSE_REASON_BYTES = 123

T = TypeVar("T")


def edge_socket(host: str, port: int, send_buffer_bytes: int) -> socket.socket:
    """Bind the edge's listening socket, with a fixed send buffer per connection.

    Connections accepted on Linux inherit the listener's SO_SNDBUF. A fixed
    size turns off the kernel's autotuning, which on loopback grows a send
    buffer to tcp_wmem's maximum (4 MiB by default) at once. The buffer is
    what a slow client can hold beyond its bounded queue, so it also sets
    how soon that client starts to miss results. 0 keeps autotuning.
    """
    if send_buffer_bytes < 0:
        raise ConfigError(
            f"--send-buffer-bytes {send_buffer_bytes} is invalid: use 0 or more"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ConfigError(
            f"binding {host}:{port} failed: {exc}; set FAULTLINE_QUERY_PORT or --port"
        ) from None
    return listener


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
    if body.get("store") != settings.store_url:
        return None  # that process owns another store than the one requested
    return str(body["url"])


# --- request parameters and credentials -------------------------------------


class Viewer:
    """The caller's credentials, checked for the ``view`` role per line."""

    def __init__(self, tokens: TokenStore, authorization: str | None) -> None:
        self.tokens = tokens
        self.authorization = authorization
        self._permitted: dict[str, bool] = {}

    def require(self, line: str | None = None) -> None:
        """Raise AuthError (401 or 403) unless the caller may view ``line``.

        ``line`` None checks the token and its role only, and ``"*"``
        requires a right on every line.
        """
        self.tokens.check(self.authorization, "view", line)

    def permits(self, line: str) -> bool:
        allowed = self._permitted.get(line)
        if allowed is None:
            try:
                self.require(line)
                allowed = True
            except AuthError:
                allowed = False
            self._permitted[line] = allowed
        return allowed

    def sees_every_line(self) -> bool:
        return not self.tokens.enabled or self.permits("*")


def credentials(authorization: str | None, token: str | None) -> str | None:
    """Return the Authorization value, built from ``?token=`` when no header came."""
    if authorization:
        return authorization
    if token:
        return f"Bearer {token}"
    return None


def parse_lines(lines: str | None) -> list[str] | None:
    """Parse ``a,b`` into validated line ids; None or empty means every line."""
    if lines is None or not lines.strip():
        return None
    parts = (part.strip() for part in lines.split(","))
    return sorted({validate_line_id(part) for part in parts if part})


def parse_verdict(verdict: str | None) -> str | None:
    if verdict is None or verdict == "all":
        return None
    if verdict not in ("pass", "fail"):
        raise ConfigError(f"verdict={verdict!r} is invalid: use pass, fail or all")
    return verdict


def record_dict(record: ResultRecord) -> dict[str, Any]:
    """Return a record as the same JSON object that results.<line> carries."""
    return json.loads(record.to_json())


# --- the app's state -----------------------------------------------------------


@dataclass
class Edge:
    """Everything the routes of one app share; the lifespan fills the rest."""

    settings: Settings
    tokens: TokenStore
    hub: LiveHub
    metrics: EdgeMetrics
    store: ResultStore | None = None
    queries: ResultQueries | None = None
    frames: FrameFetcher | None = None
    live: LiveConsumer | None = None
    sink: ResultSink | None = None

    def timed(
        self, name: str, function: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Call ``function`` and record its latency as query ``name``."""
        with self.metrics.query_seconds.labels(name).time():
            return function(*args, **kwargs)

    def open_store(self) -> ResultStore:
        self.store = ResultStore(self.settings)
        self.queries = ResultQueries(self.store)
        return self.store

    def require_store(self) -> tuple[ResultStore, ResultQueries]:
        if self.store is None or self.queries is None:
            raise StoreError("the store is not open: the app has not started yet")
        return self.store, self.queries

    def known_lines(self, since_ns: int) -> set[str]:
        """Lines with results in the store since ``since_ns`` or in the live feed."""
        _, queries = self.require_store()
        return set(self.timed("known_lines", queries.known_lines, since_ns)) | set(
            self.hub.seen_lines
        )

    def viewable_lines(
        self, caller: Viewer, lines: str | None, since_ns: int
    ) -> list[str] | None:
        """Resolve a ``lines`` parameter to what the caller may read.

        Returns None for every line, or the requested lines after checking
        each. Without ``lines``, a token limited to some lines gets the lines
        with results since ``since_ns`` that it may view.
        """
        requested = parse_lines(lines)
        if requested is not None:
            for line in requested:
                caller.require(line)
            return requested
        caller.require(None)
        if caller.sees_every_line():
            return None
        return sorted(
            line for line in self.known_lines(since_ns) if caller.permits(line)
        )


def edge_of(request: Request) -> Edge:
    return request.app.state.edge


def caller_viewer(
    request: Request,
    authorization: str | None = Header(
        None, description="Bearer <token> with the view role"
    ),
    token: str | None = Query(
        None, description="the token, where no header can be sent"
    ),
) -> Viewer:
    return Viewer(edge_of(request).tokens, credentials(authorization, token))


Caller = Annotated[Viewer, Depends(caller_viewer)]


# --- app -------------------------------------------------------------------------


def create_api(
    settings: Settings,
    with_sink: bool = True,
    *,
    with_live: bool = True,
    live_options: LiveOptions | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the results edge app.

    ``with_sink`` runs the ClickHouse sink in this process; ``with_live``
    runs the live results consumer (without it the WebSocket feed carries
    backfill and heartbeats only). Tokens are read here, so a bad token file
    fails before the app serves anything.
    """
    metrics = EdgeMetrics(registry if registry is not None else CollectorRegistry())
    edge = Edge(
        settings=settings,
        tokens=TokenStore.from_settings(settings),
        hub=LiveHub(live_options or LiveOptions(), metrics),
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _running(edge, with_sink=with_sink, with_live=with_live):
            app.state.store = edge.store
            yield

    app = FastAPI(title="Faultline results edge", lifespan=lifespan)
    app.state.edge = edge
    app.state.hub = edge.hub
    app.state.metrics = metrics
    _add_error_handlers(app)
    app.include_router(service_router)
    app.include_router(store_owner_router)
    app.include_router(analytics_router)
    app.include_router(frames_router)
    app.include_router(live_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@asynccontextmanager
async def _running(
    edge: Edge, *, with_sink: bool, with_live: bool
) -> AsyncIterator[None]:
    """Open the store, start the consumers and the sink; stop them all after."""
    settings = edge.settings
    store = edge.open_store()
    edge.frames = FrameFetcher(settings)
    edge.hub.bind(asyncio.get_running_loop())

    if with_live:
        edge.live = LiveConsumer(settings, edge.hub, edge.metrics)
        edge.live.start()
    sink_thread = None
    if with_sink:
        edge.sink = ResultSink(settings, store)
        sink_thread = threading.Thread(target=edge.sink.run, name="sink", daemon=True)
        sink_thread.start()

    path = owner_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{settings.query_host}:{settings.query_port}"
    path.write_text(json.dumps({"url": url, "pid": os.getpid(), "store": store.url}))
    log.info("results edge serving %s on %s", store.url, url)
    try:
        yield
    finally:
        edge.hub.close(CloseCode.GOING_AWAY, "server shutting down")
        if edge.live is not None:
            edge.live.stop()
        if edge.sink is not None and sink_thread is not None:
            edge.sink.stop()
            sink_thread.join(timeout=30)
        edge.frames.close()
        path.unlink(missing_ok=True)
        store.close()


def _add_error_handlers(app: FastAPI) -> None:
    """Map Faultline errors to HTTP statuses with their message as detail."""

    def handler(status: int) -> Callable[[Request, Exception], Any]:
        async def respond(request: Request, exc: Exception) -> JSONResponse:
            code = getattr(exc, "status", status)
            headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
            return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

        return respond

    app.add_exception_handler(AuthError, handler(401))
    app.add_exception_handler(ConfigError, handler(422))
    app.add_exception_handler(FrameNotFoundError, handler(404))
    app.add_exception_handler(StoreError, handler(503))
    app.add_exception_handler(BrokerError, handler(503))


# --- health, metrics, dashboard ------------------------------------------------

service_router = APIRouter()


@service_router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@service_router.get("/readyz")
def readyz(request: Request) -> dict[str, Any]:
    edge = edge_of(request)
    problems = []
    if edge.sink is not None and not edge.sink.ready.is_set():
        problems.append("sink has no partitions assigned yet")
    if edge.live is not None and edge.live.failure:
        problems.append(edge.live.failure)
    elif edge.live is not None and not edge.live.ready.is_set():
        problems.append("live results consumer has not listed the topics yet")
    try:
        edge.require_store()[0].query("SELECT 1")
    except StoreError as exc:
        problems.append(str(exc))
    if problems:
        raise HTTPException(status_code=503, detail="; ".join(problems))
    return {"status": "ready"}


@service_router.get("/metrics")
def prometheus_metrics(request: Request) -> Response:
    registry = edge_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@service_router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"}
    )


# --- routes of the store owner, used by `faultline query` and the demo ---------

store_owner_router = APIRouter()


@store_owner_router.get("/v1/summary")
def summary(
    request: Request,
    caller: Caller,
    line: str | None = None,
    run_id: str = "",
) -> dict[str, Any]:
    checked = validate_line_id(line) if line is not None else None
    caller.require(checked if checked is not None else "*")
    edge = edge_of(request)
    store, _ = edge.require_store()
    return edge.timed("summary", store.summary, checked, run_id).as_dict()


@store_owner_router.get("/v1/sink")
def sink_stats(request: Request) -> dict[str, Any]:
    sink = edge_of(request).sink
    if sink is None:
        raise HTTPException(status_code=404, detail="this process runs no sink")
    return dict(sink.stats.__dict__)


@store_owner_router.get("/v1/results")
def results(
    request: Request,
    caller: Caller,
    frame_id: list[str] = Query(default_factory=list),
    run_id: str = "",
) -> dict[str, Any]:
    caller.require(None)
    if len(frame_id) > MAX_FRAME_IDS:
        raise HTTPException(
            status_code=422,
            detail=f"at most {MAX_FRAME_IDS} frame_id values per request",
        )
    edge = edge_of(request)
    store, _ = edge.require_store()
    rows = edge.timed("results_for", store.results_for, frame_id, run_id).values()
    return {"results": [row for row in rows if caller.permits(row["line_id"])]}


# --- analytics -------------------------------------------------------------------

analytics_router = APIRouter()

LinesParam = Query(None, description="comma-separated line ids; default every line")
StartParam = Query(None, description="epoch ms or ISO 8601; default end - 1 h")
EndParam = Query(None, description="epoch ms or ISO 8601; default now")
RunParam = Query("", description="replay run id; empty = live results")


def _range_body(time_range: TimeRange, **body: Any) -> dict[str, Any]:
    return {"start_ns": time_range.start_ns, "end_ns": time_range.end_ns, **body}


@analytics_router.get("/v1/lines")
def lines(request: Request, caller: Caller) -> dict[str, Any]:
    """Lines with results in the last 24 hours or in the live feed."""
    caller.require(None)
    since_ns = TimeRange.parse(None, None).end_ns - KNOWN_LINES_WINDOW_S * NS_PER_S
    known = edge_of(request).known_lines(since_ns)
    return {"lines": sorted(line for line in known if caller.permits(line))}


@analytics_router.get("/v1/lines/{line}/results")
def line_results(
    request: Request,
    caller: Caller,
    line: str,
    start: str | None = StartParam,
    end: str | None = EndParam,
    verdict: str | None = Query(None, description="pass, fail or all"),
    run_id: str = RunParam,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, description="next_cursor of the previous page"),
    order: Literal["asc", "desc"] = "asc",
) -> dict[str, Any]:
    """Results of one line captured in a time range, one page at a time."""
    checked = validate_line_id(line)
    caller.require(checked)
    time_range = TimeRange.parse(start, end)
    edge = edge_of(request)
    _, queries = edge.require_store()
    page = edge.timed(
        "results_page", queries.results_page, checked, time_range,
        run_id=run_id, verdict=parse_verdict(verdict), limit=limit,
        cursor=cursor, descending=order == "desc",
    )  # fmt: skip
    records = [record_dict(record) for record in page.results]
    return _range_body(
        time_range, line=checked, results=records, next_cursor=page.next_cursor
    )


@analytics_router.get("/v1/defect-rate")
def defect_rate(
    request: Request,
    caller: Caller,
    lines: str | None = LinesParam,
    start: str | None = StartParam,
    end: str | None = EndParam,
    run_id: str = RunParam,
) -> dict[str, Any]:
    """Frames, failed frames and defect rate per line and minute, from the rollup."""
    time_range = TimeRange.parse(start, end)
    edge = edge_of(request)
    selected = edge.viewable_lines(caller, lines, time_range.start_ns)
    if selected == []:
        return _range_body(time_range, lines={})
    _, queries = edge.require_store()
    per_line = edge.timed(
        "defect_rate", queries.defect_rate_per_minute, selected, time_range,
        run_id=run_id,
    )  # fmt: skip
    return _range_body(time_range, lines=per_line)


@analytics_router.get("/v1/defect-classes")
def defect_classes(
    request: Request,
    caller: Caller,
    lines: str | None = LinesParam,
    start: str | None = StartParam,
    end: str | None = EndParam,
    run_id: str = RunParam,
    limit: int = Query(10, ge=1, le=100),
) -> dict[str, Any]:
    """The defect classes with the most detections."""
    time_range = TimeRange.parse(start, end)
    edge = edge_of(request)
    selected = edge.viewable_lines(caller, lines, time_range.start_ns)
    if selected == []:
        return _range_body(time_range, classes=[])
    _, queries = edge.require_store()
    classes = edge.timed(
        "defect_classes", queries.top_defect_classes, selected, time_range,
        run_id=run_id, limit=limit,
    )  # fmt: skip
    return _range_body(time_range, classes=classes)


@analytics_router.get("/v1/latency")
def latency(
    request: Request,
    caller: Caller,
    lines: str | None = LinesParam,
    start: str | None = StartParam,
    end: str | None = EndParam,
    run_id: str = RunParam,
) -> dict[str, Any]:
    """Percentiles of each stage's latency, in seconds."""
    time_range = TimeRange.parse(start, end)
    edge = edge_of(request)
    selected = edge.viewable_lines(caller, lines, time_range.start_ns)
    if selected == []:
        return _range_body(time_range, frames=0, stages_s={})
    _, queries = edge.require_store()
    body = edge.timed(
        "latency", queries.latency_percentiles, selected, time_range, run_id=run_id
    )
    return _range_body(time_range, **body)


@analytics_router.get("/v1/models")
def models(
    request: Request,
    caller: Caller,
    lines: str | None = LinesParam,
    start: str | None = StartParam,
    end: str | None = EndParam,
    run_id: str = RunParam,
    all_runs: bool = Query(False, description="list replay runs too, ignoring run_id"),
) -> dict[str, Any]:
    """Model names and versions that produced results, per line and run."""
    time_range = TimeRange.parse(start, end)
    edge = edge_of(request)
    selected = edge.viewable_lines(caller, lines, time_range.start_ns)
    if selected == []:
        return _range_body(time_range, models=[])
    _, queries = edge.require_store()
    found = edge.timed(
        "models", queries.model_versions, selected, time_range,
        run_id=None if all_runs else run_id,
    )  # fmt: skip
    return _range_body(time_range, models=found)


# --- frames ----------------------------------------------------------------------

frames_router = APIRouter()


@frames_router.get("/v1/frames/{topic}/{partition}/{offset}")
def frame(
    request: Request,
    caller: Caller,
    topic: str,
    partition: int = PathParam(ge=0),
    offset: int = PathParam(ge=0),
    annotated: bool = Query(False, description="return a JPEG with the stored boxes"),
    run_id: str = Query("", description="run whose result is drawn (empty = live)"),
) -> Response:
    """The frame's original bytes from Kafka, or a JPEG with its boxes drawn."""
    caller.require(check_frames_topic(topic))
    edge = edge_of(request)
    if edge.frames is None:
        raise BrokerError("frame fetch is not running: the app has not started yet")
    fetched = edge.timed("frame", edge.frames.fetch, topic, partition, offset)
    frame_id = fetched.header_text("frame-id")
    headers = {
        "Cache-Control": "private, max-age=3600",
        "X-Frame-Id": frame_id,
        "X-Camera-Id": fetched.header_text("camera-id"),
        "X-Captured-At-Ns": fetched.header_text("captured-at"),
    }
    if not annotated:
        return Response(
            fetched.payload, media_type=fetched.content_type, headers=headers
        )
    _, queries = edge.require_store()
    record = None
    if frame_id:
        record = edge.timed("frame_result", queries.result_for_frame, frame_id, run_id)
    if record is None:
        raise FrameNotFoundError(
            f"no stored result for frame {frame_id or '(no frame-id header)'} in run "
            f"{run_id!r} yet; the sink stores results about once a second"
        )
    body = edge.timed("annotate", annotate, fetched, record)
    headers["X-Detections"] = str(len(record.detections))
    return Response(body, media_type="image/jpeg", headers=headers)


# --- live ------------------------------------------------------------------------

live_router = APIRouter()


@live_router.websocket("/v1/results")
async def live_results(
    websocket: WebSocket,
    lines: str | None = None,
    verdict: str | None = None,
    since: str | None = None,
    run_id: str = "",
    token: str | None = None,
) -> None:
    """Stream results of some lines; see docs/results.md for messages and codes."""
    edge: Edge = websocket.app.state.edge
    await websocket.accept()
    caller = Viewer(
        edge.tokens, credentials(websocket.headers.get("authorization"), token)
    )
    try:
        requested = parse_lines(lines)
        live_filter = LiveFilter(
            frozenset(requested) if requested is not None else None,
            parse_verdict(verdict),
            run_id,
        )
        since_ns = parse_time_ns(since, "since") if since else None
    except ConfigError as exc:
        await websocket.close(CloseCode.INVALID_REQUEST, _reason(exc))
        return
    checked_lines: list[str | None] = list(requested) if requested else [None]
    try:
        for line in checked_lines:
            caller.require(line)
    except AuthError as exc:
        code = CloseCode.UNAUTHORIZED if exc.status == 401 else CloseCode.FORBIDDEN
        await websocket.close(code, _reason(exc))
        return
    if edge.live is not None and edge.live.failure:
        await websocket.close(CloseCode.INTERNAL_ERROR, _reason(edge.live.failure))
        return
    every_line = requested is not None or caller.sees_every_line()
    try:
        subscription = edge.hub.subscribe(
            live_filter, None if every_line else caller.permits
        )
    except HubFullError as exc:
        await websocket.close(CloseCode.TRY_AGAIN_LATER, _reason(exc))
        return
    session = LiveSession(
        hub=edge.hub,
        subscription=subscription,
        send=websocket.send_text,
        receive=websocket.receive,
        close=websocket.close,
        since_ns=since_ns,
        backfill=_backfill_loader(edge, caller, subscription, since_ns),
    )
    try:
        await session.run()
    except WebSocketDisconnect:
        pass
    except StoreError as exc:
        log.warning("backfill for a live client failed: %s", exc)
        await _close_quietly(
            websocket, CloseCode.INTERNAL_ERROR, "backfill from the store failed"
        )


def _backfill_loader(
    edge: Edge, caller: Viewer, subscription: Subscription, since_ns: int | None
) -> BackfillLoader | None:
    """Return a coroutine function that loads a session's backfill from the store."""
    if since_ns is None:
        return None
    live_filter = subscription.filter

    def load() -> Backfill:
        _, queries = edge.require_store()
        if live_filter.lines is not None or subscription.permits is None:
            query_lines = sorted(live_filter.lines) if live_filter.lines else None
        else:
            known = edge.known_lines(since_ns)
            query_lines = sorted(line for line in known if caller.permits(line))
        return queries.results_since(
            query_lines, since_ns, run_id=live_filter.run_id,
            verdict=live_filter.verdict, limit=edge.hub.options.backfill_max_results,
        )  # fmt: skip

    async def load_in_thread() -> Backfill:
        return await asyncio.to_thread(edge.timed, "backfill", load)

    return load_in_thread


def _reason(error: object) -> str:
    encoded = str(error).encode("utf-8")[:MAX_CLOSE_REASON_BYTES]
    return encoded.decode("utf-8", "ignore")


async def _close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except (RuntimeError, WebSocketDisconnect):
        pass  # the client is gone already

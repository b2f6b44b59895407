"""The ingest edge: frames over HTTP and WebSocket into ``frames.<line>``.

Routes (all under ``/v1/lines/{line}``, each needing a token with the
``ingest`` role on the line when tokens are configured):

    POST   /frames                          one frame, body = image bytes
    POST   /frames:batch                    multipart, one frame per part
    POST   /uploads                         start a chunked upload
    PUT    /uploads/{upload_id}/chunks/{i}  one chunk, any order, repeatable
    GET    /uploads/{upload_id}             received and missing chunks
    POST   /uploads/{upload_id}:complete    assemble, check and produce
    DELETE /uploads/{upload_id}             abort
    WS     /stream                          binary envelopes, credit-based

plus ``/healthz``, ``/readyz``, ``/metrics`` and the OpenAPI page ``/docs``.

Invariants:

- The edge replies 202 to a frame (or acks it on a WebSocket) only after the
  broker's delivery report, from an idempotent producer with acks=all. The reply's
  partition and offset come from that report.
- The edge keeps a frame's bytes only until the produce call returns, because
  librdkafka copies them into its queue. Chunks of an unfinished upload are
  the exception: they wait on disk (see ``ingest.uploads``).
- The frames of one batch or one WebSocket are produced in the order they
  arrive, keyed by camera id, so one camera's frames keep their order in its
  partition. Frames sent on separate HTTP requests keep their order only
  when the client waits for each reply before the next request.
- While the broker is unreachable the edge replies 503 with Retry-After
  without producing, and ``/readyz`` returns 503.
- Every rejection carries a JSON body ``{error, status, message, value,
  limit}``: ``error`` is a code from a fixed set, ``value`` the offending
  value and ``limit`` the bound or the accepted values.

The producer and its broker state live in ``ingest.producer``, the request
checks and multipart parsing in ``ingest.request_parsing``, and the WebSocket route
in ``ingest.stream``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ingest.metrics import UNKNOWN_LINE, EdgeMetrics
from ingest.producer import PRODUCER_CLOSE_TIMEOUT_S, EdgeProducer, RepeatFilter
from ingest.request_parsing import (
    API_PREFIX,
    FRAME_LIMIT_HINT,
    BatchPart,
    FrameFields,
    IngestError,
    frame_fields,
    iter_batch_parts,
    multipart_boundary,
    pick_field,
    read_body,
    too_large,
)
from ingest.stream import add_stream_route, ws_max_message_bytes
from ingest.uploads import (
    ChecksumMismatch,
    InvalidChunk,
    InvalidUpload,
    InvalidUploadId,
    UploadBusy,
    UploadError,
    UploadExpired,
    UploadIncomplete,
    UploadNotFound,
    UploadStorageFull,
    UploadStore,
    UploadTooLarge,
)
from pipeline.auth import AuthError, TokenStore
from pipeline.errors import ConfigError
from pipeline.settings import Settings
from pipeline.topics import format_position
from schemas.images import check_image
from schemas.records import CONTENT_TYPES, FrameHeaders

log = logging.getLogger(__name__)

RAW_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            content_type: {"schema": {"type": "string", "format": "binary"}}
            for content_type in CONTENT_TYPES
        },
    }
}


UPLOAD_ERROR_STATUS: dict[type[UploadError], int] = {
    InvalidUploadId: 422,
    InvalidUpload: 422,
    InvalidChunk: 422,
    ChecksumMismatch: 422,
    UploadNotFound: 404,
    UploadExpired: 410,
    UploadTooLarge: 413,
    UploadIncomplete: 409,
    UploadBusy: 409,
    UploadStorageFull: 507,
}


def upload_error(error: UploadError) -> IngestError:
    status = UPLOAD_ERROR_STATUS.get(type(error), 422)
    return IngestError(
        status, error.code, str(error), value=error.value, limit=error.limit
    )


# One warning per status and error code every 10 s. The metrics count them all.
REJECTION_LOG = logging.getLogger(f"{__name__}.rejections")
REJECTION_LOG.addFilter(RepeatFilter(10.0, key_words=2, min_level=logging.WARNING))


# The edge


def upload_dir(settings: Settings) -> Path:
    return settings.ingest_upload_dir or settings.home_dir / "uploads"


class IngestEdge:
    """State of one edge process: producer, tokens, upload store and metrics."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = EdgeMetrics(registry)
        self.tokens = TokenStore.from_settings(settings)
        self.producer = EdgeProducer(settings, self.metrics)
        self.uploads = UploadStore(
            upload_dir(settings),
            chunk_bytes=settings.ingest_upload_chunk_bytes,
            max_upload_bytes=settings.max_message_bytes,
            max_total_bytes=settings.ingest_upload_max_total_bytes,
            ttl_s=settings.ingest_upload_ttl_s,
        )
        self._cleanup_task: asyncio.Task[None] | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        await self.producer.start()
        self._cleanup_task = asyncio.create_task(self._remove_expired_uploads())
        try:
            yield
        finally:
            self._cleanup_task.cancel()
            await self.producer.close()
            log.info("ingest edge stopped")

    async def _remove_expired_uploads(self) -> None:
        interval_s = min(self.settings.ingest_upload_ttl_s / 4, 60.0)
        while True:
            try:
                totals = await asyncio.to_thread(self.uploads.remove_expired)
            except OSError:
                log.exception(
                    "removing expired uploads from %s failed", self.uploads.root
                )
            else:
                self.metrics.uploads_expired.inc(len(totals.expired))
                self.metrics.uploads_open.set(totals.open_uploads)
                self.metrics.uploads_reserved_bytes.set(totals.reserved_bytes)
            await asyncio.sleep(interval_s)

    def authorize(self, authorization: str | None, line: str) -> str:
        """Return the token's name, or raise IngestError 401 or 403."""
        try:
            return self.tokens.check(authorization, "ingest", line)
        except AuthError as exc:
            code = "unauthorized" if exc.status == 401 else "forbidden"
            raise IngestError(exc.status, code, str(exc)) from None

    async def open_line(self, authorization: str | None, line: str) -> None:
        """Check the token, then that the line exists: 401, 403, 404 or 503."""
        self.authorize(authorization, line)
        await self.producer.require_line(line)

    def metric_line(self, line: str) -> str:
        return line if self.producer.known_line(line) else UNKNOWN_LINE

    def reject(self, line: str, error: IngestError) -> None:
        """Count a rejection and log it, as a warning for 5xx statuses."""
        self.metrics.frames_rejected.labels(self.metric_line(line), error.code).inc()
        level = logging.WARNING if error.status >= 500 else logging.DEBUG
        REJECTION_LOG.log(
            level,
            "%d %s on line %s: %s",
            error.status,
            error.code,
            line[:80],
            error.message,
        )

    def require_broker(self) -> None:
        if not self.producer.reachable:
            raise self.producer.unavailable()

    def submit(
        self, line: str, fields: FrameFields, payload: bytes
    ) -> Awaitable[dict[str, Any]]:
        """Check and produce one frame, and return an awaitable of the 202 reply body.

        The checks and the produce call happen now, so frames submitted one
        after another keep their order. Raises IngestError 413, 415, 429 or 503
        before producing. The awaitable raises IngestError when the broker
        rejects the frame.
        """
        limit = self.settings.max_message_bytes
        if len(payload) > limit:
            raise too_large(len(payload), limit, "frame", FRAME_LIMIT_HINT)
        problem = check_image(payload, fields.content_type)
        if problem is not None:
            raise IngestError(
                415,
                "not-an-image",
                problem,
                value=fields.content_type,
                limit=list(CONTENT_TYPES),
            )
        headers = FrameHeaders.new(
            line,
            fields.camera_id,
            fields.content_type,
            captured_at_ns=fields.captured_at_ns,
            frame_id=fields.frame_id,
        )
        future = self.producer.produce(
            line,
            key=fields.camera_id.encode("utf-8"),
            value=payload,
            headers=headers.to_kafka(),
            timestamp_ms=headers.captured_at_ns // 1_000_000,
        )
        return self._acknowledged(line, headers, len(payload), future)

    async def _acknowledged(
        self, line: str, headers: FrameHeaders, size: int, future: asyncio.Future[Any]
    ) -> dict[str, Any]:
        delivery = await self.producer.wait(line, future, size)
        self.metrics.frames_accepted.labels(line).inc()
        self.metrics.bytes_accepted.labels(line).inc(size)
        return {
            "frame_id": headers.frame_id,
            "line": line,
            "camera_id": headers.camera_id,
            "captured_at": headers.captured_at_ns,
            "topic": delivery.topic,
            "partition": delivery.partition,
            "offset": delivery.offset,
            "position": format_position(
                delivery.topic, delivery.partition, delivery.offset
            ),
        }

    async def settle_item(
        self, line: str, index: int, pending: Awaitable[dict[str, Any]]
    ) -> dict[str, Any]:
        """Return one batch item's result: the ack, or the error body."""
        try:
            return {"index": index, "status": 202, **(await pending)}
        except IngestError as error:
            self.reject(line, error)
            return {"index": index, **error.to_json()}

    def batch_item(
        self, line: str, part: BatchPart, camera_id: str | None, captured_at: str | None
    ) -> dict[str, Any] | asyncio.Future[dict[str, Any]]:
        """Check and produce one part; return its error item or its settling task."""
        prefix = f"part {part.index}"
        names = (f"{prefix} Camera-Id", f"{prefix} Captured-At", f"{prefix} Frame-Id")
        limit = self.settings.max_message_bytes
        try:
            if part.size > limit:
                raise too_large(
                    part.size, limit, f"part {part.index}", FRAME_LIMIT_HINT
                )
            fields = frame_fields(
                part.headers.get("content-type"),
                part.headers.get("camera-id", camera_id),
                part.headers.get("captured-at", captured_at),
                part.headers.get("frame-id"),
                names=names,
            )
            pending = self.submit(line, fields, bytes(part.data))
        except IngestError as error:
            self.reject(line, error)
            return {"index": part.index, **error.to_json()}
        return asyncio.ensure_future(self.settle_item(line, part.index, pending))


# Application


class UploadStart(BaseModel):
    """Body of the request that starts a chunked upload."""

    size: int
    content_type: str
    camera_id: str
    captured_at: int | str | None = None
    frame_id: str | None = None
    sha256: str | None = None


SHA256_PATTERN = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_START_BODY_BYTES = 16 * 1024

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description}
    for status, description in (
        (401, "missing or invalid bearer token"),
        (403, "the token has no ingest right on this line"),
        (404, "unknown line: its frames topic does not exist"),
        (413, "frame larger than FAULTLINE_MAX_MESSAGE_BYTES"),
        (415, "unsupported content type, or bytes that are not that image type"),
        (422, "invalid camera id, frame id or capture time"),
        (429, "producer queue full; retry after Retry-After"),
        (503, "broker unreachable; retry after Retry-After"),
    )
}


def create_edge(
    settings: Settings | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    """Build the ingest edge app, its metrics in ``registry`` (default: a new one)."""
    settings = settings or Settings()
    edge = IngestEdge(
        settings, registry if registry is not None else CollectorRegistry()
    )
    app = FastAPI(
        title="Faultline ingest edge",
        description="Frames over HTTP and WebSocket into frames.<line>, acknowledged "
        "after the broker wrote them.",
        lifespan=edge.lifespan,
    )
    app.state.edge = edge
    _add_error_handlers(app, edge)
    _add_frame_routes(app, edge)
    _add_upload_routes(app, edge)
    add_stream_route(app, edge)
    _add_probe_routes(app, edge)
    return app


def uvicorn_config(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    registry: CollectorRegistry | None = None,
    **options: Any,
) -> Any:
    """Return a ``uvicorn.Config`` serving the edge, sized for the largest frame.

    ``options`` go to uvicorn unchanged, for example ``ssl_certfile`` and
    ``ssl_keyfile`` for TLS.
    """
    return uvicorn.Config(
        create_edge(settings, registry),
        host=host or settings.ingest_host,
        port=settings.ingest_port if port is None else port,
        ws_max_size=ws_max_message_bytes(settings),
        # Encoded images do not compress, so deflate would only cost CPU.
        ws_per_message_deflate=False,
        **options,
    )


@contextmanager
def running_edge(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    start_timeout_s: float = 30.0,
) -> Iterator[str]:
    """Serve the edge from a thread of this process and yield its base URL.

    Port 0 binds a free port. For tests and for embedding the edge in
    another program; ``faultline ingest`` runs uvicorn in the main thread.
    """
    config = uvicorn_config(
        settings, host=host, port=port, registry=registry, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="ingest-edge", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ConfigError(f"the ingest edge did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=PRODUCER_CLOSE_TIMEOUT_S + start_timeout_s)


def _add_error_handlers(app: FastAPI, edge: IngestEdge) -> None:
    async def on_ingest_error(request: Request, exc: IngestError) -> JSONResponse:
        edge.reject(request.path_params.get("line", ""), exc)
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=exc.headers)

    async def on_upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return await on_ingest_error(request, upload_error(exc))

    async def on_validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        return await on_ingest_error(request, validation_error(exc.errors()))

    async def on_http_error(
        request: Request, exc: StarletteHTTPException
    ) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(
            exc.status_code, "http-error"
        )
        error = IngestError(
            exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"
        )
        return JSONResponse(
            error.to_json(), status_code=exc.status_code, headers=exc.headers
        )

    # Starlette passes each handler only exceptions of its registered class.
    app.add_exception_handler(IngestError, on_ingest_error)  # type: ignore[arg-type]
    app.add_exception_handler(UploadError, on_upload_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]


def validation_error(problems: Any) -> IngestError:
    """Turn pydantic's error list into one 422 IngestError naming the first problem."""
    problems = list(problems)
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ())) or "request"
    more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
    try:
        value = jsonable_encoder(first.get("input"))
    except (TypeError, ValueError):
        value = repr(first.get("input"))[:80]
    return IngestError(
        422,
        "invalid-request",
        f"{where}: {first.get('msg', 'invalid')}{more}",
        value=value,
    )


def _add_frame_routes(app: FastAPI, edge: IngestEdge) -> None:
    settings = edge.settings

    @app.post(
        API_PREFIX + "/frames",
        status_code=202,
        summary="Send one frame; the reply carries its topic, partition and offset",
        openapi_extra=RAW_IMAGE_BODY,
        responses=ERROR_RESPONSES,
    )
    async def post_frame(
        request: Request,
        line: str,
        camera_id_header: str | None = Header(
            None, alias="Camera-Id", description="Camera id, the Kafka key."
        ),
        captured_at_header: str | None = Header(
            None,
            alias="Captured-At",
            description="Capture time: epoch ns or RFC 3339. Default: arrival.",
        ),
        frame_id_header: str | None = Header(
            None, alias="Frame-Id", description="Frame id. Default: a new UUID."
        ),
        camera_id: str | None = Query(
            None, description="Camera id, instead of the header."
        ),
        captured_at: str | None = Query(
            None, description="Capture time, instead of the header."
        ),
        frame_id: str | None = Query(
            None, description="Frame id, instead of the header."
        ),
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        fields = frame_fields(
            request.headers.get("content-type"),
            pick_field("Camera-Id", camera_id_header, "camera_id", camera_id),
            pick_field("Captured-At", captured_at_header, "captured_at", captured_at),
            pick_field("Frame-Id", frame_id_header, "frame_id", frame_id),
            names=("Camera-Id", "Captured-At", "Frame-Id"),
        )
        edge.require_broker()
        payload = await read_body(
            request, settings.max_message_bytes, "frame", FRAME_LIMIT_HINT
        )
        pending = edge.submit(line, fields, payload)
        del payload
        return JSONResponse(await pending, status_code=202)

    @app.post(
        API_PREFIX + "/frames:batch",
        status_code=202,
        summary="Send many frames as multipart parts; 207 when some were rejected",
        responses={
            207: {"description": "some items rejected; see each item's status"},
            **ERROR_RESPONSES,
        },
    )
    async def post_batch(
        request: Request,
        line: str,
        camera_id_header: str | None = Header(
            None,
            alias="Camera-Id",
            description="Camera id of parts without their own Camera-Id.",
        ),
        captured_at_header: str | None = Header(
            None,
            alias="Captured-At",
            description="Capture time of parts without their own.",
        ),
        camera_id: str | None = Query(
            None, description="Camera id, instead of the header."
        ),
        captured_at: str | None = Query(
            None, description="Capture time, instead of the header."
        ),
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        boundary = multipart_boundary(request.headers.get("content-type"))
        default_camera = pick_field(
            "Camera-Id", camera_id_header, "camera_id", camera_id
        )
        default_captured = pick_field(
            "Captured-At", captured_at_header, "captured_at", captured_at
        )
        edge.require_broker()
        max_frames = settings.ingest_batch_max_frames
        items: list[dict[str, Any] | asyncio.Future[dict[str, Any]]] = []
        try:
            async for part in iter_batch_parts(
                request, boundary, settings.max_message_bytes
            ):
                if part.index >= max_frames:
                    error = IngestError(
                        413,
                        "batch-too-large",
                        f"batch has more than {max_frames} frames, so part "
                        f"{part.index} "
                        "and later parts were not read; send them in another request "
                        "(FAULTLINE_INGEST_BATCH_MAX_FRAMES)",
                        value=part.index + 1,
                        limit=max_frames,
                    )
                    edge.reject(line, error)
                    items.append({"index": part.index, **error.to_json()})
                    break
                items.append(
                    edge.batch_item(line, part, default_camera, default_captured)
                )
        except MultipartParseError as exc:
            error = IngestError(
                400,
                "invalid-multipart",
                f"multipart body is malformed after {len(items)} parts: {exc}",
                value=len(items),
            )
            if not items:
                raise error from None
            edge.reject(line, error)
            items.append({"index": len(items), **error.to_json()})
        if not items:
            raise IngestError(
                422,
                "invalid-request",
                "batch has no parts: send one image per part",
                value=0,
            )
        results = [item if isinstance(item, dict) else await item for item in items]
        accepted = sum(1 for result in results if result["status"] == 202)
        headers = {}
        if any(result["status"] in (429, 503) for result in results):
            headers["Retry-After"] = str(settings.ingest_retry_after_s)
        return JSONResponse(
            {
                "accepted": accepted,
                "rejected": len(results) - accepted,
                "items": results,
            },
            status_code=202 if accepted == len(results) else 207,
            headers=headers,
        )


def _add_upload_routes(app: FastAPI, edge: IngestEdge) -> None:
    uploads = edge.uploads
    prefix = API_PREFIX + "/uploads"

    @app.post(
        prefix,
        status_code=201,
        summary="Start a chunked upload; the reply names the upload id and chunk size",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": UploadStart.model_json_schema()}
                },
            }
        },
        responses={
            **ERROR_RESPONSES,
            507: {"description": "open uploads reserve the whole budget"},
        },
    )
    async def start_upload(request: Request, line: str) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        raw = await read_body(
            request, MAX_START_BODY_BYTES, "upload start body", "", "invalid-request"
        )
        try:
            start = UploadStart.model_validate_json(raw)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        fields = frame_fields(
            start.content_type,
            start.camera_id,
            None if start.captured_at is None else str(start.captured_at),
            start.frame_id,
            names=("camera_id", "captured_at", "frame_id"),
        )
        if start.sha256 is not None and not SHA256_PATTERN.match(start.sha256):
            raise IngestError(
                422,
                "invalid-request",
                "sha256 must be 64 hex digits",
                value=start.sha256[:80],
            )
        frame = {
            "camera_id": fields.camera_id,
            "content_type": fields.content_type,
            "captured_at_ns": fields.captured_at_ns or time.time_ns(),
            "frame_id": fields.frame_id,
        }
        status = await asyncio.to_thread(
            uploads.start, line, start.size, frame, start.sha256 or ""
        )
        location = f"/v1/lines/{line}/uploads/{status.meta.upload_id}"
        return JSONResponse(
            status.to_json(), status_code=201, headers={"Location": location}
        )

    @app.put(
        prefix + "/{upload_id}/chunks/{index}",
        summary="Put one chunk by index, again to retry",
    )
    async def put_chunk(
        request: Request, line: str, upload_id: str, index: str
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        if not index.isdigit():
            raise IngestError(
                422,
                "invalid-chunk",
                f"chunk index {index[:80]!r} is not a non-negative integer",
                value=index[:80],
            )
        status = await asyncio.to_thread(uploads.status, line, upload_id)
        data = await read_body(
            request,
            status.meta.chunk_bytes,
            f"chunk {index}",
            f"(chunk_bytes of upload {upload_id})",
            code="invalid-chunk",
        )
        status = await asyncio.to_thread(
            uploads.put_chunk, line, upload_id, int(index), data
        )
        return JSONResponse(status.to_json())

    @app.get(
        prefix + "/{upload_id}", summary="Received and missing chunks of an upload"
    )
    async def upload_status(
        request: Request, line: str, upload_id: str
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        status = await asyncio.to_thread(uploads.status, line, upload_id)
        return JSONResponse(status.to_json())

    @app.post(
        prefix + "/{upload_id}:complete",
        status_code=202,
        summary="Assemble, check and produce the frame; delete the upload on ack",
        responses={
            **ERROR_RESPONSES,
            409: {"description": "chunks missing, or completing already"},
        },
    )
    async def complete_upload(
        request: Request, line: str, upload_id: str
    ) -> JSONResponse:
        await edge.open_line(request.headers.get("authorization"), line)
        edge.require_broker()
        meta, payload = await asyncio.to_thread(uploads.assemble, line, upload_id)
        try:
            fields = FrameFields(
                meta.frame["camera_id"],
                meta.frame["content_type"],
                meta.frame["captured_at_ns"],
                meta.frame.get("frame_id"),
            )
            pending = edge.submit(line, fields, payload)
            del payload
            reply = await pending
        except BaseException:
            uploads.release(upload_id)
            raise
        await asyncio.to_thread(uploads.finish, upload_id)
        return JSONResponse({**reply, "upload_id": upload_id}, status_code=202)

    @app.delete(
        prefix + "/{upload_id}",
        status_code=204,
        summary="Abort an upload and delete its chunks",
    )
    async def abort_upload(request: Request, line: str, upload_id: str) -> Response:
        await edge.open_line(request.headers.get("authorization"), line)
        await asyncio.to_thread(uploads.abort, line, upload_id)
        return Response(status_code=204)


def _add_probe_routes(app: FastAPI, edge: IngestEdge) -> None:
    producer = edge.producer

    @app.get("/healthz", summary="Liveness: 503 after a fatal producer error")
    async def healthz() -> JSONResponse:
        alive = producer.alive()
        body = {"status": "ok" if alive else "failed", "broker": producer.state.value}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get(
        "/readyz", summary="Readiness: 200 only while the producer reaches the broker"
    )
    async def readyz() -> JSONResponse:
        ready = producer.reachable
        body = {"ready": ready, "broker": producer.state.value}
        if ready:
            return JSONResponse(body)
        headers = {"Retry-After": str(edge.settings.ingest_retry_after_s)}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics of this edge")
    async def metrics() -> Response:
        return Response(generate_latest(edge.registry), media_type=CONTENT_TYPE_LATEST)

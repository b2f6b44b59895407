"""The WebSocket route of the ingest edge: envelopes in, credit-based flow control."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from ingest.request_parsing import (
    API_PREFIX,
    FRAME_LIMIT_HINT,
    IngestError,
    frame_fields,
    too_large,
)
from pipeline.settings import Settings

if TYPE_CHECKING:
    # Imported only for annotations, because ingest.edge imports this module.
    from ingest.edge import IngestEdge

log = logging.getLogger(__name__)

# WebSocket envelope: 4-byte big-endian header length, JSON header, image.
ENVELOPE_LENGTH_BYTES = 4
MAX_ENVELOPE_HEADER_BYTES = 16 * 1024


def encode_envelope(header: dict[str, Any], payload: bytes) -> bytes:
    """Build one WebSocket frame message: header length, JSON header, image bytes."""
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return len(encoded).to_bytes(ENVELOPE_LENGTH_BYTES, "big") + encoded + payload


def decode_envelope(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Split a WebSocket frame message, raising a 422 IngestError if it is malformed."""
    if len(message) < ENVELOPE_LENGTH_BYTES:
        raise IngestError(
            422,
            "invalid-envelope",
            f"message of {len(message)} bytes is shorter than the "
            f"{ENVELOPE_LENGTH_BYTES}-byte header length",
            value=len(message),
        )
    length = int.from_bytes(message[:ENVELOPE_LENGTH_BYTES], "big")
    if length > MAX_ENVELOPE_HEADER_BYTES or ENVELOPE_LENGTH_BYTES + length > len(
        message
    ):
        raise IngestError(
            422,
            "invalid-envelope",
            f"header length {length} is invalid for a message of {len(message)} "
            f"bytes (at most {MAX_ENVELOPE_HEADER_BYTES})",
            value=length,
            limit=MAX_ENVELOPE_HEADER_BYTES,
        )
    raw = message[ENVELOPE_LENGTH_BYTES : ENVELOPE_LENGTH_BYTES + length]
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IngestError(
            422,
            "invalid-envelope",
            f"header is not valid JSON: {exc}",
            value=raw[:80].decode("utf-8", "replace"),
        ) from None
    if not isinstance(header, dict):
        raise IngestError(
            422,
            "invalid-envelope",
            "header must be a JSON object",
            value=type(header).__name__,
        )
    return header, message[ENVELOPE_LENGTH_BYTES + length :]


def ws_max_message_bytes(settings: Settings) -> int:
    """Largest WebSocket message the server reads: a frame plus its envelope."""
    return (
        settings.max_message_bytes + ENVELOPE_LENGTH_BYTES + MAX_ENVELOPE_HEADER_BYTES
    )


class FrameStream:
    """One WebSocket client of a line: envelopes in, one ack or error out per frame.

    The first server message grants ``credit`` frames in flight. Every
    message the client sends takes one credit and its ack or error returns
    it, and the server frees the slot before sending the reply. A frame that
    arrives while the client has no credit gets a ``throttle`` message. The
    server then reads nothing more from the socket until a slot frees, which
    slows the client through TCP, and processes the frame after that. While
    the connection is open, no frame is dropped without an ack or an error.
    """

    def __init__(self, edge: IngestEdge, websocket: WebSocket, line: str) -> None:
        self.edge = edge
        self.websocket = websocket
        self.line = line
        self.credit = edge.settings.ingest_ws_credit
        self.slots = asyncio.Semaphore(self.credit)
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pending: set[asyncio.Task[None]] = set()
        self.received = 0

    async def run(self) -> None:
        self.edge.metrics.ws_connections.labels(self.line).inc()
        sender = asyncio.create_task(self._send_loop())
        self.outbox.put_nowait({"type": "credit", "credit": self.credit})
        try:
            await self._receive_loop()
        finally:
            for task in list(self.pending):
                task.cancel()
            sender.cancel()
            self.edge.metrics.ws_connections.labels(self.line).dec()

    async def _receive_loop(self) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            index = self.received
            self.received += 1
            header, payload, problem = self._parse(message)
            sequence = header.get("seq", index)
            if self.slots.locked():
                self.edge.metrics.ws_credit_exceeded.labels(self.line).inc()
                self.outbox.put_nowait(
                    {
                        "type": "throttle",
                        "seq": sequence,
                        "in_flight": self.credit,
                        "credit": self.credit,
                        "message": f"frame sent with {self.credit} frames in flight, "
                        "beyond the credit; it waits for a free slot. Wait for "
                        "acks before sending more",
                    }
                )
            await self.slots.acquire()
            if problem is not None:
                self._reply_error(sequence, problem)
                continue
            self._submit(sequence, header, payload)

    def _parse(
        self, message: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes, IngestError | None]:
        data = message.get("bytes")
        if data is None:
            return (
                {},
                b"",
                IngestError(
                    422,
                    "invalid-envelope",
                    "text messages are not frames: send binary messages of a 4-byte "
                    "big-endian header length, a JSON header and the image bytes",
                    value="text",
                ),
            )
        if len(data) > ws_max_message_bytes(self.edge.settings):
            return (
                {},
                b"",
                too_large(
                    len(data),
                    ws_max_message_bytes(self.edge.settings),
                    "message",
                    FRAME_LIMIT_HINT,
                ),
            )
        try:
            header, payload = decode_envelope(data)
        except IngestError as error:
            return {}, b"", error
        sequence = header.get("seq")
        if sequence is not None and not isinstance(sequence, (int, str)):
            return (
                {},
                b"",
                IngestError(
                    422,
                    "invalid-envelope",
                    "seq must be an integer or a string",
                    value=repr(sequence)[:80],
                ),
            )
        return header, payload, None

    def _submit(self, sequence: Any, header: dict[str, Any], payload: bytes) -> None:
        try:
            fields = frame_fields(
                header.get("content_type"),
                header.get("camera_id"),
                header.get("captured_at"),
                header.get("frame_id"),
                names=("camera_id", "captured_at", "frame_id"),
            )
            pending = self.edge.submit(self.line, fields, payload)
        except IngestError as error:
            self._reply_error(sequence, error)
            return
        task = asyncio.create_task(self._acknowledge(sequence, pending))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _acknowledge(
        self, sequence: Any, pending: Awaitable[dict[str, Any]]
    ) -> None:
        try:
            reply = await pending
        except IngestError as error:
            self._reply_error(sequence, error)
            return
        self._reply({"type": "ack", "seq": sequence, **reply})

    def _reply_error(self, sequence: Any, error: IngestError) -> None:
        self.edge.reject(self.line, error)
        self._reply({"type": "error", "seq": sequence, **error.to_json()})

    def _reply(self, body: dict[str, Any]) -> None:
        # The slot frees before the reply leaves, so a client that sends its
        # next frame on receipt of an ack never exceeds its credit.
        self.slots.release()
        self.outbox.put_nowait(body)

    async def _send_loop(self) -> None:
        while True:
            body = await self.outbox.get()
            try:
                await self.websocket.send_text(json.dumps(body, separators=(",", ":")))
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:
                log.debug(
                    "line %s: WebSocket send failed, client gone: %s", self.line, exc
                )
                return


async def deny_websocket(websocket: WebSocket, error: IngestError) -> None:
    """Reject a WebSocket handshake with the HTTP status and JSON body of ``error``."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response = JSONResponse(
            error.to_json(), status_code=error.status, headers=error.headers
        )
        await websocket.send_denial_response(response)
        return
    # Servers without the denial extension: close codes 4000 + HTTP status.
    reason = error.message.encode("utf-8")[:120].decode("utf-8", "ignore")
    await websocket.close(code=4000 + error.status, reason=reason)


def add_stream_route(app: FastAPI, edge: IngestEdge) -> None:
    @app.websocket(API_PREFIX + "/stream")
    async def stream(websocket: WebSocket, line: str) -> None:
        try:
            await edge.open_line(websocket.headers.get("authorization"), line)
        except IngestError as error:
            edge.reject(line, error)
            await deny_websocket(websocket, error)
            return
        await websocket.accept()
        await FrameStream(edge, websocket, line).run()

"""The edge's listening socket and the checks of ``faultline serve`` flags."""

from __future__ import annotations

import socket
import sys

import pytest

from pipeline.api import edge_socket
from pipeline.cli import main
from pipeline.errors import ConfigError

SEND_BUFFER_BYTES = 65536


@pytest.mark.skipif(
    sys.platform != "linux", reason="SO_SNDBUF inheritance is Linux behaviour"
)
def test_edge_socket_fixes_send_buffer() -> None:
    listener = edge_socket("127.0.0.1", 0, SEND_BUFFER_BYTES)
    with listener:
        listener.listen()
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted:
                size = accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    # Linux doubles the requested size for its bookkeeping (socket(7)).
    assert size == 2 * SEND_BUFFER_BYTES


def test_edge_socket_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="FAULTLINE_QUERY_PORT"):
            edge_socket("127.0.0.1", port, 0)


def test_edge_socket_rejects_negative_buffer() -> None:
    with pytest.raises(ConfigError, match="--send-buffer-bytes"):
        edge_socket("127.0.0.1", 0, -1)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--queue-messages", "0", "queue_messages"),
        ("--heartbeat-s", "0", "heartbeat_s"),
        ("--max-clients", "0", "max_clients"),
    ],
)
def test_serve_rejects_invalid_flags(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", flag, value]) == 2
    error = capsys.readouterr().err
    assert error.startswith("faultline serve: ")
    assert message in error

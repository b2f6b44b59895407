"""The ``faultline`` command.

Each subcommand parses its arguments, builds ``Settings`` (env vars first,
flags override) and calls into the library; nothing here keeps state.
Errors derived from FaultlineError print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.errors import ConfigError, FaultlineError
from pipeline.settings import Settings

log = logging.getLogger("faultline")

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for field in ("bootstrap_servers", "home", "clickhouse_url", "model", "device",
                  "max_batch_frames", "batch_timeout_s", "query_port", "worker_web_port", "lines"):
        value = getattr(args, field, None)
        if value is not None:
            overrides[field] = value
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"FAULTLINE_{'_'.join(str(p) for p in e['loc']).upper()}={e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"invalid setting: {problems} (set by env var or flag)") from None


def _print_json(body: Any) -> None:
    print(json.dumps(body, indent=2, sort_keys=True))


# --- kafka -----------------------------------------------------------------


def cmd_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.launcher import LocalKafka

    kafka = LocalKafka(settings)
    if args.action == "start":
        print(f"Kafka is up at {kafka.start()}")
    elif args.action == "stop":
        print("Kafka stopped" if kafka.stop() else "Kafka was not running")
    else:
        status = kafka.status()
        _print_json({k: str(v) if isinstance(v, Path) else v for k, v in status.__dict__.items()})
        return 0 if status.running else 1
    return 0


def cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.kafka import ensure_line_topics, list_lines

    if args.action == "create":
        if not args.line:
            raise FaultlineError("topics create needs at least one --line")
        for line in args.line:
            created = ensure_line_topics(settings, line)
            print(f"line {line}: created {', '.join(created) if created else 'nothing (all exist)'}")
    else:
        for line in list_lines(settings):
            print(line)
    return 0


# --- processes -------------------------------------------------------------


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from faust import Worker

    import time

    from agents.app import create_app, frame_topics

    topics = frame_topics(settings)
    while not topics:
        log.info("no frames.<line> topic yet; create one with `faultline topics create`")
        time.sleep(settings.metadata_max_age_s)
        topics = frame_topics(settings)
    app = create_app(settings, topics)
    worker = Worker(app, loglevel=args.log_level.lower(), quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
    return 0


def check_store_owner(settings: Settings) -> None:
    """Reject a ClickHouse URL of the wrong kind or a chDB path owned elsewhere."""
    from pipeline.api import read_owner

    url = settings.store_url
    if not url.startswith(("chdb://", "http://", "https://")):
        raise ConfigError(
            f"FAULTLINE_CLICKHOUSE_URL {url!r} is invalid: use chdb:///abs/path "
            "or http://host:8123"
        )
    owner = read_owner(settings) if url.startswith("chdb://") else None
    if owner is not None:
        raise ConfigError(
            f"the chDB store {url} is already owned by the process serving {owner}; "
            "stop it first or set FAULTLINE_HOME or FAULTLINE_CLICKHOUSE_URL to another store"
        )


def cmd_sink(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from pipeline.api import create_api

    check_store_owner(settings)

    uvicorn.run(
        create_api(settings),
        host=settings.query_host,
        port=settings.query_port,
        log_level=args.log_level.lower(),
    )
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from pipeline.api import create_api, edge_socket
    from pipeline.live import LiveOptions

    check_store_owner(settings)

    flags = {"queue_messages": args.queue_messages, "heartbeat_s": args.heartbeat_s,
             "max_clients": args.max_clients}
    try:
        options = LiveOptions(**{name: value for name, value in flags.items() if value is not None})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config = uvicorn.Config(
        create_api(settings, with_sink=not args.no_sink, live_options=options),
        host=settings.query_host,
        port=settings.query_port,
        log_level=args.log_level.lower(),
        # Compression would run once per client and message; the fan-out
        # sends every result to every client, so CPU is the scarcer resource.
        ws_per_message_deflate=False,
    )
    listener = edge_socket(settings.query_host, settings.query_port, args.send_buffer_bytes)
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from ingest.edge import uvicorn_config

    config = uvicorn_config(
        settings,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    uvicorn.Server(config).run()
    return 0


# --- sources ---------------------------------------------------------------


def cmd_feed(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.feed import feed, folder_frames, simulator_frames
    from pipeline.kafka import ensure_line_topics

    ensure_line_topics(settings, args.line)
    if args.source == "simulator":
        frames = simulator_frames(args.line, args.count or 100, cameras=args.cameras, seed=args.seed)
    else:
        frames = folder_frames(Path(args.source), camera_id=args.camera, limit=args.count)
    report = feed(settings, args.line, frames, fps=args.fps, progress=True)
    print(f"sent {report.sent}, acked {report.acked}, failed {report.failed}")
    for error in report.errors[:10]:
        print(f"  failed: {error}", file=sys.stderr)
    return 0 if report.failed == 0 else 1


def cmd_camera(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.camera import CameraOptions, camera_frames, run_camera

    # httpx logs every request at INFO, which would drown the progress line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    frames, total = camera_frames(
        args.source, args.line, camera_id=args.camera, count=args.count,
        quality=args.quality, cameras=args.cameras, seed=args.seed,
    )
    options = CameraOptions(
        line=args.line,
        via=args.via,
        url=args.url or f"http://{settings.ingest_host}:{settings.ingest_port}",
        token=settings.ingest_token.get_secret_value(),
        fps=args.fps,
        max_retries=args.max_retries,
        progress=not args.no_progress,
    )
    report = run_camera(settings, options, frames, total=total)
    print(f"sent {report.sent}, acked {report.acked}, failed {report.failed}, "
          f"retries {report.retries}")
    for error in report.errors[:10]:
        print(f"  failed: {error}", file=sys.stderr)
    return 0 if report.failed == 0 and report.acked == report.sent else 1


# --- queries ---------------------------------------------------------------


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.report import fetch_summary, format_summary

    summary = fetch_summary(settings, line=args.line, run_id=args.run_id)
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.demo import Demo

    return Demo(settings, lines=args.lines.split(","), frames=args.frames, fps=args.fps,
                source=args.source, keep_running=args.keep_running).run()


# --- models ----------------------------------------------------------------


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from models.train import TrainConfig, train

    config = TrainConfig(
        data=Path(args.data), model=args.model, imgsz=args.imgsz, epochs=args.epochs,
        hours=args.hours, batch=args.batch, seed=args.seed, device=args.train_device,
        out=Path(args.out), resume=args.resume, data_source=args.data_source,
        data_licence=args.data_licence,
    )
    print(f"model card: {train(config)}")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from models.export import ExportConfig, export_onnx
    from models.registry import Registry

    if args.weights:
        if not args.out:
            raise ConfigError("export --weights needs --out PATH.onnx")
        weights, imgsz, out = Path(args.weights), args.imgsz or 640, Path(args.out)
    else:
        spec = Registry(settings.model_registry).get(settings.model)
        if not args.out and spec.onnx is None:
            raise ConfigError(
                f"model {spec.name!r} has no 'onnx' path in {settings.model_registry}; "
                "pass --out PATH.onnx"
            )
        weights, imgsz = spec.weights, args.imgsz or spec.imgsz
        out = Path(args.out) if args.out else spec.onnx  # type: ignore[assignment]
    options = {"opset": args.opset} if args.opset else {}
    config = ExportConfig(
        weights=weights, out=out, imgsz=imgsz, simplify=not args.no_simplify, **options
    )
    print(f"ONNX model: {export_onnx(config)}")
    return 0


def cmd_eval(args: argparse.Namespace, settings: Settings) -> int:
    from models.evaluate import EvalConfig, evaluate, format_report

    config = EvalConfig(
        data=Path(args.data), split=args.split, limit=args.limit, run_id=args.run_id,
        batch=args.batch,
    )
    report = evaluate(settings, config)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(format_report(report))
    limit = args.max_map50_delta
    if limit is not None and abs(report.map50_delta) > limit:
        print(
            f"faultline eval: mAP50 of the stored results differs from offline val by "
            f"{report.map50_delta:+.4f}, more than --max-map50-delta {limit}",
            file=sys.stderr,
        )
        return 1
    return 0


# --- parser ----------------------------------------------------------------


class DefaultsFormatter(argparse.HelpFormatter):
    """Show an option's default unless it is unset (then env vars decide)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
            return text + " (default: %(default)s)"
        return text


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", dest="bootstrap_servers",
                        help="Kafka bootstrap servers (env FAULTLINE_BOOTSTRAP_SERVERS)")
    parser.add_argument("--home", type=Path,
                        help="folder for local data, logs and pid files (env FAULTLINE_HOME)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faultline",
        description="Visual inspection on Kafka: batched YOLO inference, ClickHouse results.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        child = sub.add_parser(
            name, help=help_text, description=help_text,
            formatter_class=DefaultsFormatter,
        )
        _add_common(child)
        child.set_defaults(handler=handler)
        return child

    kafka = command("kafka", cmd_kafka, "start, stop or inspect the local single-node Kafka broker")
    kafka.add_argument("action", choices=["start", "stop", "status"],
                       help="start (or reuse) the broker, stop it, or print its state as JSON")

    topics = command("topics", cmd_topics, "create or list the per-line topics")
    topics.add_argument("action", choices=["create", "list"],
                        help="create the topics of each --line, or list the lines on the broker")
    topics.add_argument("--line", action="append", help="line id (repeatable)")

    worker = command("worker", cmd_worker, "run an inference worker (Faust) over frames.*")
    worker.add_argument("--model", help="model name in the registry (env FAULTLINE_MODEL)")
    worker.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference device")
    worker.add_argument("--max-batch-frames", dest="max_batch_frames", type=int,
                        help="maximum frames per inference batch")
    worker.add_argument("--batch-timeout-s", dest="batch_timeout_s", type=float,
                        help="maximum wait for a batch to fill, in seconds")
    worker.add_argument("--web-port", dest="worker_web_port", type=int,
                        help="port of the worker's web server")
    worker.add_argument("--lines", help="comma-separated line ids to serve (default: every line)")

    sink = command("sink", cmd_sink, "store results.* in ClickHouse and serve queries over HTTP")
    sink.add_argument("--clickhouse-url", dest="clickhouse_url",
                      help="chdb:///abs/path or http://host:8123 (default: chDB under --home)")
    sink.add_argument("--port", dest="query_port", type=int, help="port of the query API")
    sink.add_argument("--lines", help="comma-separated line ids to store (default: every line)")

    serve = command("serve", cmd_serve,
                    "run the results edge: live WebSocket feed, analytics API, frame fetch, "
                    "dashboard, and the sink")
    serve.add_argument("--clickhouse-url", dest="clickhouse_url",
                       help="chdb:///abs/path or http://host:8123 (default: chDB under --home)")
    serve.add_argument("--port", dest="query_port", type=int, help="HTTP port (env FAULTLINE_QUERY_PORT)")
    serve.add_argument("--lines", help="comma-separated line ids to serve (default: every line)")
    serve.add_argument("--no-sink", action="store_true",
                       help="run no sink here; for extra edges beside one sink on a ClickHouse server")
    serve.add_argument("--queue-messages", type=int,
                       help="messages one WebSocket client may have waiting before the oldest "
                            "are dropped (default 1024)")
    serve.add_argument("--heartbeat-s", type=float,
                       help="seconds without a message before a client gets a heartbeat (default 10)")
    serve.add_argument("--max-clients", type=int,
                       help="maximum WebSocket clients; more are closed with code 1013 (default 1000)")
    serve.add_argument("--send-buffer-bytes", type=int, default=256 * 1024,
                       help="kernel send buffer of each connection, in bytes (default 262144; "
                            "0 = kernel autotuning, which lets a slow client hold up to "
                            "tcp_wmem's maximum)")

    ingest_cmd = command("ingest", cmd_ingest,
                         "run the ingest edge: frames over HTTP and WebSocket into frames.<line>")
    ingest_cmd.add_argument("--host", help="address to bind (env FAULTLINE_INGEST_HOST)")
    ingest_cmd.add_argument("--port", type=int, help="HTTP port (env FAULTLINE_INGEST_PORT)")
    ingest_cmd.add_argument("--ssl-certfile",
                            help="PEM certificate: serve HTTPS and WSS (or end TLS at an ingress)")
    ingest_cmd.add_argument("--ssl-keyfile", help="PEM private key of --ssl-certfile")

    feed_cmd = command("feed", cmd_feed, "produce image files or simulator frames to frames.<line>")
    feed_cmd.add_argument("--line", required=True, help="line id")
    feed_cmd.add_argument("--source", required=True,
                          help="folder of .jpg/.png/.bmp files (fed in name order; the file "
                               "name without suffix becomes the frame id) or 'simulator'")
    feed_cmd.add_argument("--fps", type=float, default=0.0, help="frames per second (0 = as fast as acked)")
    feed_cmd.add_argument("--count", type=int, help="maximum frames to send (simulator default 100)")
    feed_cmd.add_argument("--camera", default="cam-1", help="camera id for folder sources")
    feed_cmd.add_argument("--cameras", type=int, default=2, help="number of simulated cameras")
    feed_cmd.add_argument("--seed", type=int, default=0, help="simulator seed")

    camera_cmd = command("camera", cmd_camera,
                         "send frames from a folder, a video file or the simulator at a steady rate")
    camera_cmd.add_argument("--line", required=True, help="line id")
    camera_cmd.add_argument("--source", required=True,
                            help="folder of .jpg/.png/.bmp files, a video file, or 'simulator'")
    camera_cmd.add_argument("--fps", type=float, default=5.0,
                            help="frames per second (0 = as fast as acked)")
    camera_cmd.add_argument("--via", choices=["http", "ws", "kafka"], default="http",
                            help="the ingest edge over HTTP or WebSocket, or Kafka directly")
    camera_cmd.add_argument("--url", help="base URL of the ingest edge (default from "
                            "FAULTLINE_INGEST_HOST and FAULTLINE_INGEST_PORT); the bearer "
                            "token comes from env FAULTLINE_INGEST_TOKEN")
    camera_cmd.add_argument("--camera", default="cam-1", help="camera id for folder and video sources")
    camera_cmd.add_argument("--count", type=int, help="maximum frames to send (simulator default 100)")
    camera_cmd.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100 of video frames")
    camera_cmd.add_argument("--cameras", type=int, default=2, help="simulated cameras")
    camera_cmd.add_argument("--seed", type=int, default=0, help="simulator seed")
    camera_cmd.add_argument("--max-retries", type=int, default=8,
                            help="retries per frame on 429, 503 and lost connections")
    camera_cmd.add_argument("--no-progress", action="store_true", help="print no progress line")

    query = command("query", cmd_query, "print the results summary read from ClickHouse")
    query.add_argument("--line", help="only this line")
    query.add_argument("--run-id", default="", help="replay run id (empty = live results)")
    query.add_argument("--json", action="store_true", help="print JSON")
    query.add_argument("--clickhouse-url", dest="clickhouse_url", help="as for sink")

    demo = command("demo", cmd_demo, "start Kafka, a worker and the sink, feed two lines, print a summary")
    demo.add_argument("--lines", default="line-1,line-2", help="comma-separated line ids")
    demo.add_argument("--frames", type=int, default=60, help="frames per line")
    demo.add_argument("--fps", type=float, default=10.0, help="frames per second per line")
    demo.add_argument("--source", default="simulator", help="'simulator' or a folder of images")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave Kafka, the worker and the sink running afterwards")

    train_cmd = command("train", cmd_train, "train a YOLO detector offline and write its model card")
    train_cmd.add_argument("--data", required=True, help="data.yaml of a YOLO-layout data set")
    train_cmd.add_argument("--model", default="yolov8n.yaml",
                           help="architecture yaml (yolov8n.yaml or a path) or local .pt to start from")
    train_cmd.add_argument("--imgsz", type=int, default=640, help="training image size in pixels")
    train_cmd.add_argument("--epochs", type=int, default=100, help="epochs (an upper bound with --hours)")
    train_cmd.add_argument("--hours", type=float, help="stop after this many hours; the LR schedule fits it")
    train_cmd.add_argument("--batch", type=int, default=16, help="images per training batch")
    train_cmd.add_argument("--seed", type=int, default=0, help="random seed")
    train_cmd.add_argument("--train-device", default="cpu", help="cpu, 0 (first GPU), ...")
    train_cmd.add_argument("--out", required=True, help="run folder for weights and card.json")
    train_cmd.add_argument("--resume", action="store_true", help="resume from <out>/weights/last.pt")
    train_cmd.add_argument("--data-source", default="", help="data set name and origin, for the card")
    train_cmd.add_argument("--data-licence", default="", help="data set licence, for the card")

    export_cmd = command("export", cmd_export, "export a model's torch weights to ONNX, offline")
    export_source = export_cmd.add_mutually_exclusive_group()
    export_source.add_argument("--model", help="model name in the registry (env FAULTLINE_MODEL); "
                               "writes to its 'onnx' path unless --out is given")
    export_source.add_argument("--weights", help="local .pt file to export instead of a registry model")
    export_cmd.add_argument("--out", help="path of the .onnx file to write")
    export_cmd.add_argument("--imgsz", type=int,
                            help="input size in pixels (default: the registry's imgsz, else 640)")
    export_cmd.add_argument("--opset", type=int,
                            help="ONNX opset version (default: models.export.DEFAULT_OPSET)")
    export_cmd.add_argument("--no-simplify", action="store_true", help="skip onnxslim")

    eval_cmd = command("eval", cmd_eval,
                       "compare the metrics of stored results on a labelled split with offline val")
    eval_cmd.add_argument("--data", required=True, help="data.yaml of a YOLO-layout data set")
    eval_cmd.add_argument("--split", default="val", help="split whose image folder was fed")
    eval_cmd.add_argument("--model", help="model name in the registry (env FAULTLINE_MODEL)")
    eval_cmd.add_argument("--limit", type=int, help="evaluate only the first N images, in name order")
    eval_cmd.add_argument("--run-id", default="", help="replay run id (empty = live results)")
    eval_cmd.add_argument("--batch", type=int, default=16, help="images per batch of offline val")
    eval_cmd.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of offline val")
    eval_cmd.add_argument("--clickhouse-url", dest="clickhouse_url", help="as for sink")
    eval_cmd.add_argument("--json", action="store_true", help="print JSON")
    eval_cmd.add_argument("--max-map50-delta", type=float,
                          help="exit with status 1 when |mAP50 pipeline - val| exceeds this")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One INFO line per HTTP request would bury progress output.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        settings = _settings(args)
        return args.handler(args, settings)
    except FaultlineError as exc:
        print(f"faultline {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

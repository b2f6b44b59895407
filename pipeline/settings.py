"""Settings of every Faultline process, read from ``FAULTLINE_*`` variables.

One class serves the worker, the sink, the edges and the CLI so that limits
that must agree (message size on the producer, the topic and the consumer
fetch) are set in one place. Each field's env var is ``FAULTLINE_`` plus the
field name in capitals, for example ``FAULTLINE_MAX_BATCH_FRAMES``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGISTRY = REPO_ROOT / "models" / "registry.yaml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAULTLINE_", extra="ignore")

    home: Path = Field(
        Path(".faultline"),
        description="Folder for the local broker's data and logs, the chDB "
        "data path and pid files. Relative paths, the default included, "
        "resolve from the current working directory.",
    )

    # Kafka
    bootstrap_servers: str = Field(
        "",
        description="Kafka bootstrap servers, comma separated host:port. Empty "
        "means the local broker: 127.0.0.1:<kafka_port>.",
    )
    kafka_port: int = Field(9092, description="Port of the local broker's listener.")
    kafka_controller_port: int = Field(
        9093, description="Port of the local broker's KRaft controller listener."
    )
    kafka_start_timeout_s: float = Field(
        90.0, description="How long `faultline kafka start` waits for metadata."
    )
    max_message_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        le=256 * 1024 * 1024,
        description="Largest frame in bytes. Sets the topics' max.message.bytes, "
        "the producer's message.max.bytes and the consumers' fetch sizes together.",
    )
    frame_partitions: int = Field(
        3, ge=1, description="Partitions of each frames.<line> topic: the "
        "parallelism of one line."
    )
    result_partitions: int = Field(3, ge=1, description="Partitions of results.<line>.")
    deadletter_partitions: int = Field(1, ge=1, description="Partitions of deadletter.frames.")
    replication_factor: int = Field(1, ge=1, description="Replication of created topics.")
    metadata_max_age_s: float = Field(
        5.0,
        gt=0,
        description="Metadata refresh interval of the consumers. A topic "
        "pattern subscription sees a new line's topic within about this time.",
    )

    lines: str = Field(
        "",
        description="Comma-separated line ids that this worker or sink serves; "
        "empty serves every line, including lines added while it runs.",
    )

    # Inference worker
    model: str = Field(
        "", description="Model name in the registry; empty uses the registry's default."
    )
    model_registry: Path = Field(DEFAULT_REGISTRY, description="Model registry YAML.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Inference device: auto picks CUDA when present."
    )
    max_batch_frames: int = Field(
        16, ge=1, le=1024, description="Maximum frames in one inference batch."
    )
    batch_timeout_s: float = Field(
        0.25, gt=0, description="Maximum wait for a batch to fill, in seconds."
    )
    decode_threads: int = Field(2, ge=1, description="Threads that decode images.")
    worker_app_id: str = Field(
        "faultline-inference", description="Faust app id = consumer group of workers."
    )
    worker_web_port: int = Field(
        6066, description="Port of the Faust worker's web server (metrics, health)."
    )

    # ClickHouse
    clickhouse_url: str = Field(
        "",
        description="Empty: chDB under <home>/clickhouse. Or chdb:///abs/path, or "
        "http://host:8123 for a ClickHouse server.",
    )
    clickhouse_database: str = Field("faultline", description="Database name.")
    clickhouse_user: str = Field("default", description="ClickHouse server user.")
    clickhouse_password: SecretStr = Field(
        SecretStr(""), description="ClickHouse server password."
    )
    result_ttl_days: int = Field(
        0,
        ge=0,
        description="Delete result rows this many days after capture; 0 keeps "
        "them forever. Rows back-dated past the TTL are deleted on merge.",
    )

    # Sink
    sink_group_id: str = Field("faultline-sink", description="Consumer group of the sink.")
    sink_batch_rows: int = Field(
        1000, ge=1, description="Insert once this many result rows are buffered."
    )
    sink_batch_timeout_s: float = Field(
        1.0, gt=0, description="Insert at least this often while rows are buffered."
    )
    query_host: str = Field("127.0.0.1", description="Host the query API binds to.")
    query_port: int = Field(8090, description="Port of the query API of `faultline sink`.")

    # Ingest edge
    ingest_host: str = Field("127.0.0.1", description="Host the ingest edge binds to.")
    ingest_port: int = Field(8080, description="Port of `faultline ingest`.")
    ingest_queue_max_frames: int = Field(
        1000,
        ge=1,
        description="Maximum frames the edge's producer queues while it waits for "
        "the broker's acks. A frame beyond it gets 429.",
    )
    ingest_queue_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="The same bound in bytes. Must be at least max_message_bytes "
        "plus 64 KiB, so that the largest frame fits.",
    )
    ingest_ack_timeout_s: float = Field(
        10.0,
        ge=1.0,
        description="Maximum wait in seconds for the broker's ack of one frame, "
        "after which the edge replies 503. Sets the producer's delivery.timeout.ms.",
    )
    ingest_broker_check_interval_s: float = Field(
        1.0,
        gt=0,
        description="Seconds between the edge's metadata requests. Readiness and "
        "the list of known lines follow them.",
    )
    ingest_retry_after_s: int = Field(
        2, ge=1, description="Retry-After in seconds sent with 429 and 503 replies."
    )
    ingest_batch_max_frames: int = Field(
        64, ge=1, description="Maximum frames in one multipart batch request."
    )
    ingest_ws_credit: int = Field(
        32,
        ge=1,
        description="Frames one WebSocket client may have in flight: sent and "
        "not yet acknowledged.",
    )
    ingest_upload_dir: Path | None = Field(
        None,
        description="Folder of chunked uploads in progress; unset means "
        "<home>/uploads. Edge replicas that share uploads must share this folder.",
    )
    ingest_upload_chunk_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="Size of every chunk of a chunked upload except the last.",
    )
    ingest_upload_ttl_s: float = Field(
        3600.0,
        gt=0,
        description="Seconds after its last chunk that an unfinished upload "
        "expires and is deleted.",
    )
    ingest_upload_max_total_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=64 * 1024,
        description="Sum of the declared sizes of all open uploads. A new upload "
        "beyond it gets 507.",
    )
    ingest_token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token that `faultline camera` sends to the ingest edge.",
    )

    # Edges
    view_token: SecretStr = Field(
        SecretStr(""),
        description="Bearer token that `faultline query` and `faultline eval` "
        "send to the results edge when it checks tokens.",
    )
    tokens_file: Path | None = Field(
        None,
        description="YAML or JSON file of bearer tokens with their roles and "
        "lines. Without it and without `tokens`, the edges run without auth.",
    )
    tokens: SecretStr = Field(
        SecretStr(""),
        description="The same token list inline, as JSON (for containers).",
    )

    @field_validator("clickhouse_database")
    @classmethod
    def _database_name(cls, value: str) -> str:
        if not value.replace("_", "").isalnum():
            raise ValueError(
                f"clickhouse_database {value!r} is invalid: use letters, digits and '_'"
            )
        return value

    @model_validator(mode="after")
    def _local_bootstrap(self) -> Settings:
        if not self.bootstrap_servers:
            self.bootstrap_servers = f"127.0.0.1:{self.kafka_port}"
        return self

    @field_validator("lines")
    @classmethod
    def _lines(cls, value: str) -> str:
        from pipeline.topics import validate_line_id

        for line in filter(None, (part.strip() for part in value.split(","))):
            validate_line_id(line)
        return value

    @property
    def line_ids(self) -> tuple[str, ...]:
        return tuple(filter(None, (part.strip() for part in self.lines.split(","))))

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def store_url(self) -> str:
        """The ClickHouse DSN in force: the setting, or chDB under home."""
        if self.clickhouse_url:
            return self.clickhouse_url
        return f"chdb://{self.home_dir / 'clickhouse'}"

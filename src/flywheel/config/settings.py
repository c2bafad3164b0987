"""Process settings read from the environment (prefix ``FLYWHEEL_``) or a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

CaptureMode = Literal["full", "redacted", "metadata"]


class Settings(BaseSettings):
    """Everything a Flywheel process needs to know before it reads ``flywheel.yaml``.

    Paths left unset are derived from :attr:`home`, so one variable moves a whole installation.
    """

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_file=".env", extra="ignore")

    home: Path = Field(
        default=Path("~/.flywheel"), description="Folder for the database, artifacts and models."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite in home."
    )
    artifact_root: str | None = Field(
        default=None, description="Artifact root (folder or fsspec URL)."
    )
    model_cache: Path | None = Field(
        default=None, description="Where converted local models are kept."
    )
    config_file: Path | None = Field(
        default=None, description="flywheel.yaml; default: ./flywheel.yaml."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    admin_key: SecretStr | None = Field(
        default=None, description="Bootstrap admin API key; generated and printed once when unset."
    )
    master_key: SecretStr | None = Field(
        default=None,
        description="Master key encrypting stored secrets (urlsafe base64 of 32 bytes); "
        "default: <home>/master.key, created on first start with mode 0600.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL: limits and budgets are shared by every replica through it.",
    )
    capture: CaptureMode = Field(
        default="full",
        description="'full' stores messages and responses in traces, 'redacted' stores them with "
        "personal data and secrets masked, 'metadata' omits them; routes may override it.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, description="Largest accepted request body."
    )
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024,
        description="Largest dataset file or knowledge-base upload accepted by an import.",
    )
    fetch_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts or networks (CIDR) that URL ingestion and pipeline HTTP tools may "
        "reach although they are private or loopback (JSON list).",
    )
    request_deadline: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a gateway call may take across all its retries and fallbacks "
        "(to the first token when streaming).",
    )
    local_max_batch_size: int = Field(default=8, ge=1, le=64)
    local_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    local_threads: int | None = Field(default=None, ge=1)
    preload_models: bool = Field(default=True, description="Load local models at start-up.")
    trace_flush_seconds: float = Field(default=0.2, gt=0)
    trace_batch_size: int = Field(default=1000, ge=1)
    experiment_interval: float = Field(
        default=10.0,
        ge=0.1,
        description="Seconds between looks at the running experiments (guardrails, the "
        "sequential test, promotion or rollback).",
    )
    loop_interval: float = Field(
        default=2.0,
        ge=0.1,
        description="Seconds between the loop driver's moves (`flywheel loop`: submitting a "
        "step's job, following it, waiting for an approval or a canary).",
    )
    trace_buffer_spans: int = Field(
        default=100_000,
        ge=1,
        description="Most span and score rows held in memory for the trace writer (the batch "
        "being written included) while the database is slow or down; when full the oldest are "
        "dropped and counted.",
    )
    access_log: bool = Field(
        default=False, description="uvicorn access log (traces record every call)."
    )
    cookie_secure: bool = Field(default=True, description="Mark the UI session cookie Secure.")
    monitor_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between monitor ticks: alert rules are checked and due drift "
        "checks run.",
    )
    retention_interval: float = Field(
        default=3600.0, gt=0, description="Seconds between purges of expired traces."
    )
    metrics_public: bool = Field(
        default=False,
        description="Serve /metrics without a key (for a Prometheus on a private network).",
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="Export Flywheel's own traces to this OTLP/HTTP collector "
        "(e.g. http://127.0.0.1:4318).",
    )
    otlp_headers: dict[str, str] = Field(
        default_factory=dict, description="Headers sent to the OTLP collector (JSON object)."
    )
    approval_labels: list[str] = Field(
        default_factory=lambda: ["production"],
        description="Labels that move only through an approved request (JSON list).",
    )
    jobs_enabled: bool = Field(
        default=True, description="Run a job supervisor in this server (claims queued jobs)."
    )
    job_concurrency: int = Field(
        default=1, ge=0, le=64, description="Jobs this replica runs at once (0: none)."
    )
    job_executor: Literal["local", "ray"] = Field(
        default="local", description="Where jobs run when a submission names no executor."
    )
    job_timeout: float | None = Field(
        default=None, gt=0, description="Seconds a job may run before it is stopped."
    )
    job_memory_limit_mb: int | None = Field(
        default=None, ge=256, description="Address-space limit of a local job process (MiB)."
    )
    job_threads: int | None = Field(
        default=None, ge=1, description="torch/OpenMP threads of a local job process."
    )
    job_nice: int = Field(
        default=5, ge=0, le=19, description="CPU niceness of job processes (serving first)."
    )
    job_orphan_after: float = Field(
        default=60.0, gt=0, description="A running job silent this long (s) is orphaned."
    )
    job_heartbeat: float = Field(default=5.0, gt=0, description="Seconds between beats.")
    ray_address: str | None = Field(
        default=None, description="Ray cluster for the 'ray' executor (e.g. 127.0.0.1:6379)."
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="Export finished runs to this MLflow tracking URI."
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'flywheel.db'}"

    @property
    def resolved_artifact_root(self) -> str:
        return self.artifact_root or str(self.home_dir / "artifacts")

    @property
    def resolved_model_cache(self) -> Path:
        return (self.model_cache or self.home_dir / "models").expanduser().resolve()

    @property
    def jobs_dir(self) -> Path:
        """Where job processes keep their work folders."""
        return self.home_dir / "jobs"

    @property
    def resolved_config_file(self) -> Path | None:
        """The config file to load, or None to use the built-in defaults."""
        if self.config_file is not None:
            return self.config_file.expanduser()
        for candidate in (Path("flywheel.yaml"), self.home_dir / "flywheel.yaml"):
            if candidate.is_file():
                return candidate
        return None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()

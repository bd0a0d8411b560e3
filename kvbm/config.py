"""Configuration: one settings model read from init arguments, ``KVBM_*`` variables,
Dynamo's ``DYN_KVBM_*`` variables, a YAML file and defaults (highest first).

Validation runs in two steps. The core checks the skeleton here: the model, the page
size, and that each tier names a ``type``. Each tier's own ``config_model`` (from its
plugin) then checks the rest, so an error names the tier and the key.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError
from .layout import DTYPE_SIZES, BlockLayout, ModelSpec
from .sizes import parse_size


class ModelConfig(BaseModel):
    """The model whose KV is cached (only what fixes the KV shape)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "llama-3-8b"
    num_layers: int = Field(32, gt=0)
    num_kv_heads: int = Field(8, gt=0)
    head_dim: int = Field(128, gt=0)
    dtype: str = "bfloat16"
    outer_dim: Literal[1, 2] = 2

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPE_SIZES:
            raise ValueError(f"must be one of {sorted(DTYPE_SIZES)}")
        return v

    def spec(self) -> ModelSpec:
        return ModelSpec(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            outer_dim=self.outer_dim,
            name=self.name,
        )


class TierSpec(BaseModel):
    """The skeleton of one tier entry; the tier's plugin validates the rest."""

    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None


class TierConfig(BaseModel):
    """Keys every tier accepts. Plugins subclass it with their own keys."""

    model_config = ConfigDict(extra="forbid")
    type: str
    name: str | None = None
    capacity: int | None = Field(None, description="bytes; '64GiB', '100GB' or an integer")
    num_blocks: int | None = Field(None, gt=0, description="block slots; wins over capacity")
    policy: str = Field("lru", description="eviction policy name")
    policy_options: dict[str, Any] = Field(default_factory=dict)
    admission: str | None = Field(None, description="admission filter name; none admits all")
    admission_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("capacity", mode="before")
    @classmethod
    def _capacity(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)

    def resolve_num_blocks(self, block_bytes: int) -> int:
        """Slots this tier holds: ``num_blocks`` if given, else ``capacity // block_bytes``."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.capacity is None:
            raise ConfigError(
                f"tier {self.name!r}: neither 'capacity' nor 'num_blocks' is set; "
                "give one, e.g. capacity: 8GiB"
            )
        n = self.capacity // block_bytes
        if n < 1:
            raise ConfigError(
                f"tier {self.name!r}: key 'capacity': {self.capacity} bytes holds no block of "
                f"{block_bytes} bytes; give at least {block_bytes}"
            )
        return n


DEFAULT_TIERS: list[dict[str, Any]] = [{"type": "host", "capacity": "4GiB"}]

# Dynamo KVBM's variables: (env name, tier type, key, converter). "GB" is 10**9 bytes.
_DYN_TIER_VARS: list[tuple[str, str, str, Any]] = [
    ("DYN_KVBM_CPU_CACHE_GB", "host", "capacity", lambda v: int(float(v) * 10**9)),
    ("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "host", "num_blocks", int),
    ("DYN_KVBM_DISK_CACHE_GB", "disk", "capacity", lambda v: int(float(v) * 10**9)),
    ("DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS", "disk", "num_blocks", int),
    ("DYN_KVBM_DISK_CACHE_DIR", "disk", "path", str),
    ("DYN_KVBM_DISK_ZEROFILL_FALLBACK", "disk", "zerofill_fallback", str),
    ("DYN_KVBM_DISK_DISABLE_O_DIRECT", "disk", "disable_o_direct", str),
    ("DYN_KVBM_DISK_ALLOCATOR_TYPE", "disk", "allocator_type", str),
]
_TIER_ORDER = {"gpu": 0, "host": 1, "disk": 2, "s3": 3, "remote": 4}


def _truthy(v: str) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on")


def apply_dynamo_env(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Fold ``DYN_KVBM_*`` variables into ``data`` (a raw settings dict).

    A variable for a tier type the chain lacks adds that tier, as Dynamo's does
    (``DYN_KVBM_DISK_CACHE_GB`` alone enables a disk tier).
    """
    data = dict(data)
    tiers = [dict(t) for t in data.get("tiers", DEFAULT_TIERS)]
    for var, ttype, key, conv in _DYN_TIER_VARS:
        if var not in env:
            continue
        matches = [t for t in tiers if t.get("type") == ttype]
        if not matches:
            tiers.append({"type": ttype})
            matches = [tiers[-1]]
        try:
            value = conv(env[var])
        except ValueError as e:
            raise ConfigError(f"{var}={env[var]!r}: not a number ({e})") from None
        # A block-count override wins over a size: TierConfig.resolve_num_blocks
        # prefers num_blocks whichever source set it.
        matches[0][key] = value
    if _truthy(env.get("DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER", "")):
        for t in tiers:
            if t.get("type") == "disk":
                t["admission"] = "all"
    if "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY" in env:
        for t in tiers:
            if t.get("type") == "host":
                t["admission"] = "priority_prefix"
                opts = dict(t.get("admission_options") or {})
                opts["min_priority"] = env["DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY"]
                t["admission_options"] = opts
    tiers.sort(key=lambda t: _TIER_ORDER.get(str(t.get("type")), 99))
    data["tiers"] = tiers
    if "DYN_KVBM_METRICS" in env:
        data["metrics"] = _truthy(env["DYN_KVBM_METRICS"])
    if "DYN_KVBM_METRICS_PORT" in env:
        data["metrics_port"] = env["DYN_KVBM_METRICS_PORT"]
    if "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS" in env:
        data["leader_worker_init_timeout_secs"] = env["DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"]
    return data


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML config file as a dict; one-line ConfigError for a missing file or bad syntax."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r}: cannot be read ({e.strerror})") from None
    try:
        data = yaml.safe_load(os.path.expandvars(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r}: expected a mapping of keys at the top, got {type(data).__name__}"
        )
    return data


class _FileAndDynamoSource(PydanticBaseSettingsSource):
    """The YAML file (if any) with Dynamo's variables folded in."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self) -> dict[str, Any]:
        data = read_yaml(self.path) if self.path else {}
        return apply_dynamo_env(data, dict(os.environ))


class KvEventsConfig(BaseModel):
    """The ZMQ publisher of block stored/removed events in vLLM's KV-event format."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    endpoint: str = Field("tcp://127.0.0.1", description="ZMQ address to bind; tcp without port")
    port: int = Field(
        0, ge=0, lt=65536,
        description="0 picks a free port per instance; a fixed port is offset by dp_rank")
    topic: str = Field("", description="ZMQ topic frame of every message")
    hash_format: Literal["int64", "bytes", "dynamo"] = Field(
        "int64", description="int64: last 8 bytes of the key, big-endian (vLLM's rule); "
        "bytes: the 16-byte key; dynamo: Dynamo's 64-bit chained xxh3 hashes")
    dynamo_seed: int = Field(1337, ge=0, description="xxh3 seed of the dynamo hash format")
    dp_rank: int = Field(0, ge=0, description="data-parallel rank written into every batch")
    unknown_tokens: Literal["skip", "empty"] = Field(
        "skip", description="blocks whose token ids are unknown: skip them or send token_ids []")
    token_index_blocks: int = Field(
        131072, ge=0, description="blocks whose token ids are remembered for BlockStored")
    media: dict[str, str] = Field(
        default_factory=dict, description="medium string per tier name or type, e.g. {disk: STORAGE}")
    replay: bool = Field(
        False, description="serve missed batches on a ROUTER socket, as vLLM's replay_endpoint")
    replay_endpoint: str | None = Field(
        None, description="ZMQ address of the replay socket; tcp without port; "
        "unset: endpoint's address (ipc/inproc: endpoint + '-replay')")
    replay_port: int = Field(0, ge=0, lt=65536, description="0 picks a free port per instance")
    buffer_steps: int = Field(
        10_000, gt=0, description="past batches kept for replay (vLLM's buffer_steps)")


class KvbmSettings(BaseSettings):
    """Everything that configures a manager."""

    model_config = SettingsConfigDict(
        env_prefix="KVBM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    page_size: int = Field(16, gt=0, description="tokens per block")
    tiers: list[TierSpec] = Field(default_factory=lambda: [TierSpec(**t) for t in DEFAULT_TIERS])
    hash_algorithm: Literal["xxh3_128", "sha256"] = "xxh3_128"
    tp_rank: int = Field(0, ge=0)
    tp_size: int = Field(1, gt=0)
    lora_name: str | None = None
    cache_salt: str | None = None
    write_through: bool = Field(True, description="cascade offloads down every tier")
    io_threads: int = Field(4, gt=0, description="worker threads for lower-tier copies")
    copy_threads: int = Field(2, gt=0, description="threads one batch's memory copies are split across")
    metrics: bool = False
    metrics_port: int = Field(6880, ge=0, lt=65536)
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds")
    kv_events: KvEventsConfig = Field(default_factory=KvEventsConfig)
    leader_worker_init_timeout_secs: float = Field(120, gt=0)

    _config_file: str | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_PATH.get() or os.environ.get("KVBM_CONFIG")
        return (init_settings, env_settings, _FileAndDynamoSource(settings_cls, path))

    def layout(self) -> BlockLayout:
        return BlockLayout(self.model.spec(), self.page_size)


# The YAML path for the settings being built, set only inside ``load_settings``:
# pydantic-settings builds its sources in a classmethod that cannot take it as an
# argument. A ContextVar keeps two threads building settings from seeing each other's.
_CONFIG_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvbm_config_path", default=None)


def _format_validation_error(e: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f": value {value!r}"
        lines.append(f"{prefix}key {loc!r}{shown}: {err['msg']}")
    return "; ".join(lines)


def load_settings(
    config: str | os.PathLike[str] | dict[str, Any] | KvbmSettings | None = None,
    **overrides: Any,
) -> KvbmSettings:
    """Build settings from a YAML path, a dict, or nothing (env and defaults).

    Raises ``ConfigError`` with every problem named by key.
    """
    if isinstance(config, KvbmSettings):
        return config.model_copy(update=overrides) if overrides else config
    try:
        if isinstance(config, dict):
            data = apply_dynamo_env({**config, **overrides}, dict(os.environ))
            return KvbmSettings(**data)
        token = _CONFIG_PATH.set(None if config is None else os.fspath(config))
        try:
            return KvbmSettings(**overrides)
        finally:
            _CONFIG_PATH.reset(token)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def tier_names(specs: list[TierSpec]) -> list[str]:
    """Each tier's name: its own, else its type, numbered when a type repeats."""
    names: list[str] = []
    for i, s in enumerate(specs):
        name = s.name or s.type
        if name in names:
            name = f"{name}{i}"
        names.append(name)
    return names


def validate_tier(spec: TierSpec, name: str, config_model: type[TierConfig]) -> TierConfig:
    """Step two: the tier's own model checks its keys; errors name the tier."""
    data = spec.model_dump()
    data["name"] = name
    try:
        cfg = config_model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            _format_validation_error(e, prefix=f"tier {data['name']!r} (type {spec.type}): ")
        ) from None
    return cfg

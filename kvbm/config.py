"""Configuration: one settings model read from init arguments, ``KVBM_*`` variables,
Dynamo's ``DYN_KVBM_*`` variables, a YAML file and defaults (highest first).

Validation runs in two steps. The core checks the skeleton here: the model, the page
size, and that each tier names a ``type``. Each tier's own ``config_model`` (from its
plugin) then checks the rest, so an error names the tier and the key.

The core names no tier type. What the config needs of tier types comes from their
plugins' declarations (``TierRegistry.add``): the environment variables that set their
keys (``EnvAlias``; Dynamo's ``DYN_KVBM_CPU_*``, ``DYN_KVBM_DISK_*`` …), the default
chain, and the order tiers are sorted in.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

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
        """The ``ModelSpec`` a block layout is built from."""
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


@dataclass(frozen=True)
class EnvAlias:
    """An environment variable that sets one key of a tier type's config.

    Tier plugins declare them (``TierRegistry.add(..., env={"DYN_KVBM_CPU_CACHE_GB":
    EnvAlias("capacity", decimal_gigabytes)})``) so that Dynamo KVBM's variables keep
    working while the core names no tier type. ``key`` may be dotted
    (``admission_options.min_priority``); ``convert`` turns the variable's text into
    the value (a ``ValueError`` becomes a ``ConfigError`` naming the variable); ``also``
    sets further keys with it; ``when`` skips the variable unless it returns True (a
    flag set to false); ``adds_tier`` adds a tier of the type to a chain that lacks one,
    as Dynamo's ``DYN_KVBM_DISK_CACHE_GB`` enables a disk tier; ``every_tier`` sets the
    key on every tier of the type rather than on the first.
    """

    key: str
    convert: Callable[[str], Any] = str
    also: Mapping[str, Any] = field(default_factory=dict)
    when: Callable[[str], bool] | None = None
    adds_tier: bool = True
    every_tier: bool = False


class TierDeclarations(Protocol):
    """What the config reads of the tier types plugins registered (a ``TierRegistry``)."""

    def declarations(self) -> list[TierDeclaration]:
        """Every tier type's declaration, in registration order."""
        ...


@dataclass(frozen=True)
class TierDeclaration:
    """What a tier type declares for the config: ``TierRegistry.add``'s ``order``,
    ``env`` and ``default``."""

    type: str
    order: int | None = None
    env: Mapping[str, EnvAlias] = field(default_factory=dict)
    default: Mapping[str, Any] | None = None


#: Where a tier type whose plugin declares no ``order`` sorts: after every declared one.
UNORDERED = 99


def decimal_gigabytes(text: str) -> int:
    """Bytes of a number of decimal gigabytes (10**9 bytes), as Dynamo's ``*_GB`` variables mean."""
    return int(float(text) * 10**9)


def truthy(text: str) -> bool:
    """True for 1, true, yes, on (any case): how Dynamo's flags are read."""
    return text.strip().lower() in ("1", "true", "yes", "on")


def default_tiers(types: TierDeclarations) -> list[dict[str, Any]]:
    """The chain used when the config names none: each type that declares a ``default``."""
    decls = sorted(types.declarations(), key=_order)
    return [{"type": d.type, **d.default} for d in decls if d.default is not None]


def _order(d: TierDeclaration) -> int:
    return UNORDERED if d.order is None else d.order


def _set_key(tier: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key, copying each nested mapping it passes (the caller's stay as given)."""
    *path, last = key.split(".")
    node = tier
    for part in path:
        child = dict(node.get(part) or {})
        node[part] = child
        node = child
    node[last] = value


def _declared_types(env: Mapping[str, str]) -> TierDeclarations:
    # Plugins import this module, so it imports them only when settings are read.
    from .plugins import build_plugins

    return build_plugins(env).tiers


def apply_dynamo_env(
    data: dict[str, Any], env: Mapping[str, str], types: TierDeclarations | None = None
) -> dict[str, Any]:
    """Fold environment aliases (Dynamo's ``DYN_KVBM_*``) into ``data`` (a raw settings dict).

    The tier keys they set, the default chain and the order tiers are sorted in come
    from what the tier plugins declared (``types``; the installed plugins when None).
    A variable for a tier type the chain lacks adds that tier when its alias says so
    (``DYN_KVBM_DISK_CACHE_GB`` alone enables a disk tier).
    """
    types = types if types is not None else _declared_types(env)
    decls = sorted(types.declarations(), key=_order)
    data = dict(data)
    tiers = [dict(t) for t in data["tiers"]] if "tiers" in data else default_tiers(types)
    aliases = [(var, d.type, a) for d in decls for var, a in d.env.items() if var in env]
    # Aliases that add a tier go first, so a flag applies to a tier another variable adds.
    for var, ttype, alias in sorted(aliases, key=lambda x: not x[2].adds_tier):
        raw = env[var]
        if alias.when is not None and not alias.when(raw):
            continue
        matches = [t for t in tiers if t.get("type") == ttype]
        if not matches:
            if not alias.adds_tier:
                continue
            tiers.append({"type": ttype})
            matches = [tiers[-1]]
        try:
            value = alias.convert(raw)
        except ValueError as e:
            raise ConfigError(
                f"{var}={raw!r}: not a valid value ({e}); {var} sets key {alias.key!r} of "
                f"the {ttype!r} tier"
            ) from None
        # A block-count override wins over a size: TierConfig.resolve_num_blocks
        # prefers num_blocks whichever source set it.
        for t in matches if alias.every_tier else matches[:1]:
            _set_key(t, alias.key, value)
            for k, v in alias.also.items():
                _set_key(t, k, v)
    order = {d.type: _order(d) for d in decls}
    tiers.sort(key=lambda t: order.get(str(t.get("type")), UNORDERED))
    data["tiers"] = tiers
    if "DYN_KVBM_METRICS" in env:
        data["metrics"] = truthy(env["DYN_KVBM_METRICS"])
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

    def __init__(self, settings_cls: type[BaseSettings], path: str | None,
                 types: TierDeclarations | None) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.types = types

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self) -> dict[str, Any]:
        data = read_yaml(self.path) if self.path else {}
        return apply_dynamo_env(data, dict(os.environ), self.types)


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
    # Filled by the file-and-environment source with the tier plugins' default chain
    # when nothing names one; the default here is only for a source-less build.
    tiers: list[TierSpec] = Field(default_factory=list)
    hash_algorithm: Literal["xxh3_128", "sha256"] = "xxh3_128"
    tp_rank: int = Field(0, ge=0)
    tp_size: int = Field(1, gt=0)
    lora_name: str | None = None
    cache_salt: str | None = None
    write_through: bool = Field(True, description="cascade offloads down every tier")
    io_threads: int = Field(4, gt=0, description="worker threads for lower-tier copies")
    copy_threads: int = Field(2, gt=0, description="threads one batch's memory copies are split across")
    probe_timeout_s: float = Field(
        0.5, gt=0, description="longest a match waits for shared tiers (S3, peers) to say which "
        "blocks other instances wrote; a later answer counts as misses")
    close_timeout_s: float = Field(
        30.0, ge=0, description="longest close() waits for the write-through cascade")
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
        """Init arguments, then ``KVBM_*`` variables, then the YAML file with aliases folded in."""
        path = _CONFIG_PATH.get() or os.environ.get("KVBM_CONFIG")
        return (init_settings, env_settings,
                _FileAndDynamoSource(settings_cls, path, _TIER_TYPES.get()))

    def layout(self) -> BlockLayout:
        """The block layout of the configured model and page size."""
        return BlockLayout(self.model.spec(), self.page_size)


# The YAML path for the settings being built, set only inside ``load_settings``:
# pydantic-settings builds its sources in a classmethod that cannot take it as an
# argument. A ContextVar keeps two threads building settings from seeing each other's.
_CONFIG_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("kvbm_config_path", default=None)
# The tier declarations for the same build, for the same reason (None: the installed plugins').
_TIER_TYPES: contextvars.ContextVar[TierDeclarations | None] = contextvars.ContextVar(
    "kvbm_tier_types", default=None)


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
    *,
    tier_types: TierDeclarations | None = None,
    **overrides: Any,
) -> KvbmSettings:
    """Build settings from a YAML path, a dict, or nothing (env and defaults).

    ``tier_types`` (a built ``Plugins.tiers``) supplies the tier plugins' declarations
    (environment aliases, default chain, order); without it the installed plugins are
    read. Raises ``ConfigError`` with every problem named by key.
    """
    if isinstance(config, KvbmSettings):
        return config.model_copy(update=overrides) if overrides else config
    try:
        if isinstance(config, dict):
            data = apply_dynamo_env({**config, **overrides}, dict(os.environ), tier_types)
            return KvbmSettings(**data)
        token = _CONFIG_PATH.set(None if config is None else os.fspath(config))
        types_token = _TIER_TYPES.set(tier_types)
        try:
            return KvbmSettings(**overrides)
        finally:
            _TIER_TYPES.reset(types_token)
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

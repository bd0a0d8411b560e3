"""Configuration: one settings model read from init arguments, ``KVBM_*`` variables,
Dynamo's ``DYN_KVBM_*`` variables, a YAML file and defaults (highest first).

Validation runs in two steps. The core checks the skeleton here: the model, the page
size, and that each tier names a ``type``. Each tier's own ``config_model`` (from its
plugin) then checks the rest, so an error names the tier and the key.

The core names no tier type. What the config needs of tier types comes from their
plugins' declarations (``TierRegistry.add``): the environment variables that set their
keys (``EnvAlias``; Dynamo's ``DYN_KVBM_CPU_*``, ``DYN_KVBM_DISK_*`` …), the default
chain, and the order tiers are sorted in.

Every problem is one ``ConfigError`` line naming the tier, the key, the value (never
a secret's) and what is allowed; nothing a user would not mean is accepted silently:
unknown keys and ``KVBM_*`` variables (with the name they probably meant), a tier
name given twice, a page size no engine uses, sizes this machine cannot hold. The
YAML reader is ``kvbm.config_yaml``; secrets are wrapped by ``kvbm.redact``.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .config_decl import (
    DYNAMO_KEYS,
    EnvAlias,
    TierDeclaration,
    TierDeclarations,
    _declared_types,
    apply_dynamo_env,
    decimal_gigabytes,
    default_tiers,
    truthy,
)
from .config_env import OWN_VARIABLES, check_environment, settings_variables
from .config_errors import format_validation_error
from .config_yaml import read_yaml
from .errors import ConfigError
from .layout import DTYPE_SIZES, BlockLayout, ModelSpec
from .machine import memory_total
from .redact import hide_secrets
from .safepaths import NAME_RULE, check_name
from .sizes import format_size, parse_size

__all__ = [
    "EnvAlias", "KvEventsConfig", "KvbmSettings", "ModelConfig", "ProbeContext", "ProbeResult",
    "TierConfig", "TierDeclaration", "TierDeclarations", "TierSpec", "apply_dynamo_env",
    "decimal_gigabytes", "default_tiers", "is_generated_name", "load_settings", "read_yaml", "tier_names", "truthy",
    "validate_tier",
    "validate_tiers",
]

# Free text that reaches logs, metrics labels and hashes: printable, one line.
_TEXT_RE = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
#: Bytes of the planner's metadata per slot of a tier (registry, policy, hash), measured
#: with a full LRU registry; a chain whose registries alone would not fit is refused.
REGISTRY_BYTES_PER_SLOT = 256


def _check_text(v: str | None) -> str | None:
    if v is not None and not _TEXT_RE.fullmatch(v):
        raise ValueError("must be 1-256 printable characters on one line")
    return v


class ModelConfig(BaseModel):
    """The model whose KV is cached (only what fixes the KV shape)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = "llama-3-8b"
    num_layers: int = Field(32, gt=0, le=4096)
    num_kv_heads: int = Field(8, gt=0, le=4096)
    head_dim: int = Field(128, gt=0, le=65536)
    dtype: str = "bfloat16"
    outer_dim: Literal[1, 2] = 2

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_text(v) or v

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


def _check_tier_name(v: str | None) -> str | None:
    # A tier's name reaches thread names, metrics labels and (per tier) file names.
    if v is not None:
        try:
            check_name(v)
        except ValueError:
            raise ValueError(f"must be {NAME_RULE}") from None
    return v


class TierSpec(BaseModel):
    """The skeleton of one tier entry; the tier's plugin validates the rest.

    The rest is kept as given until then, except secrets: a secret key's value is a
    ``SecretStr`` from here on, so no repr of the settings can show it.
    """

    model_config = ConfigDict(extra="allow")
    type: str = Field(..., min_length=1, max_length=64)
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _hide_secrets(cls, data: Any) -> Any:
        return hide_secrets(data)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return _check_tier_name(v)


@dataclass(frozen=True)
class ProbeContext:
    """What a tier's ``probe`` may need besides its config: its name and size in slots."""

    name: str
    num_blocks: int
    block_bytes: int
    #: The longest one network probe may wait (a HEAD of a bucket).
    timeout_s: float = 5.0


@dataclass(frozen=True)
class ProbeResult:
    """One thing ``kvbm config check --probe`` touched: ``ok`` and one line saying what
    was touched and what came of it (with the fix when it failed)."""

    ok: bool
    line: str


class TierConfig(BaseModel):
    """Keys every tier accepts. Plugins subclass it with their own keys.

    A subclass may override ``resolve_num_blocks`` to refuse a size the machine cannot
    hold, and ``probe`` to touch what the tier needs (``kvbm config check --probe``).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    #: Where ``resolve_num_blocks`` errors point a user lowering this tier's size
    #: (e.g. the Dynamo variables that set it); tier configs may override it.
    size_hint: ClassVar[str] = "capacity or num_blocks"
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

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return _check_tier_name(v)

    def resolve_num_blocks(self, block_bytes: int) -> int:
        """Slots this tier holds: ``num_blocks`` if given, else ``capacity // block_bytes``.

        Refuses a tier whose planner metadata alone (``REGISTRY_BYTES_PER_SLOT`` per
        slot) would take more than half this machine's memory.
        """
        if self.num_blocks is not None:
            n = self.num_blocks
            key = "num_blocks"
        elif self.capacity is None:
            raise ConfigError(
                f"tier {self.name!r}: neither 'capacity' nor 'num_blocks' is set; "
                "give one, e.g. capacity: 8GiB"
            )
        else:
            n = self.capacity // block_bytes
            key = "capacity"
            if n < 1:
                raise ConfigError(
                    f"tier {self.name!r}: key 'capacity': {self.capacity} bytes holds no block "
                    f"of {block_bytes} bytes; give at least {block_bytes}"
                )
        meta, total = n * REGISTRY_BYTES_PER_SLOT, memory_total()
        if meta > total // 2:
            raise ConfigError(
                f"tier {self.name!r}: key {key!r}: {n} blocks of {format_size(block_bytes)} "
                f"need {format_size(meta)} of memory to track alone, more than half this "
                f"machine's {format_size(total)}; lower {self.size_hint}, or raise page_size "
                "for larger blocks"
            )
        return n

    def probe(self, ctx: ProbeContext) -> list[ProbeResult]:
        """Touch what this tier needs on this machine (paths, buckets, free memory or
        space) and say how each went, one line each; nothing is left behind. The
        default touches nothing."""
        return []


def known_variables(types: TierDeclarations) -> set[str]:
    """Every environment variable kvbm reads: its own, ``KVBM_<KEY>``, and the aliases
    the tier plugins declare."""
    declared = {var for d in types.declarations() for var in d.env}
    return (set(OWN_VARIABLES) | set(DYNAMO_KEYS.values()) | declared
            | settings_variables(KvbmSettings))


class _FileAndDynamoSource(PydanticBaseSettingsSource):
    """The YAML file (if any) with Dynamo's variables folded in; refuses variables
    kvbm does not read."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None, origin: str,
                 types: TierDeclarations | None) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.origin = origin
        self.types = types

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self) -> dict[str, Any]:
        env = dict(os.environ)
        types = self.types if self.types is not None else _declared_types(env)
        used: set[str] = set()
        data = read_yaml(self.path, used, self.origin) if self.path else {}
        check_environment(env, known_variables(types), used)
        return apply_dynamo_env(data, env, types)


class KvEventsConfig(BaseModel):
    """The ZMQ publisher of block stored/removed events in vLLM's KV-event format."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    endpoint: str = Field("tcp://127.0.0.1", description="ZMQ address to bind; tcp without port")
    port: int = Field(
        5557, ge=0, lt=65536,
        description="vLLM's default 5557; offset by dp_rank; 0 picks a free port per instance")
    topic: str = Field("", description="ZMQ topic frame of every message")
    hash_format: Literal["int64", "bytes", "dynamo"] = Field(
        "int64", description="int64: last 8 bytes of the key, big-endian (vLLM's rule); "
        "bytes: the 16-byte key; dynamo: Dynamo's 64-bit chained xxh3 hashes")
    dynamo_seed: int = Field(1337, ge=0, lt=2**64, description="xxh3 seed of the dynamo hash format")
    dp_rank: int = Field(0, ge=0, lt=65536, description="data-parallel rank written into every batch")
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

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(tcp|ipc|inproc)://[^\s]+", v):
            raise ValueError("must be a ZMQ address: tcp://HOST (the port is its own key), "
                             "ipc://PATH or inproc://NAME")
        return v


#: Page sizes that are not powers of two are accepted when they are a multiple of this:
#: vLLM sizes the attention pages of hybrid (attention + Mamba) models to such multiples
#: (e.g. 528 or 1056 tokens) so that they hold a whole Mamba state.
PAGE_SIZE_MULTIPLE = 16


class KvbmSettings(BaseSettings):
    """Everything that configures a manager."""

    model_config = SettingsConfigDict(
        env_prefix="KVBM_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        allow_inf_nan=False,
    )

    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    page_size: int = Field(
        16, gt=0, le=1 << 16,
        description="tokens per block: a power of two (vLLM's default 16), or a multiple of 16 "
        "as vLLM picks for hybrid models")
    # Filled by the file-and-environment source with the tier plugins' default chain
    # when nothing names one; the default here is only for a source-less build.
    tiers: list[TierSpec] = Field(default_factory=list)
    hash_algorithm: Literal["xxh3_128", "sha256"] = "xxh3_128"
    tp_rank: int = Field(0, ge=0)
    tp_size: int = Field(1, gt=0, le=65536)
    lora_name: str | None = None
    cache_salt: str | None = None
    write_through: bool = Field(True, description="cascade offloads down every tier")
    io_threads: int = Field(4, gt=0, le=1024, description="worker threads for lower-tier copies")
    copy_threads: int = Field(
        2, gt=0, le=256, description="threads one batch's memory copies are split across")
    engine_huge_pages: Literal["auto"] | bool = Field(
        "auto", description="move the engine's CPU KV tensors onto 2 MiB pages (MADV_HUGEPAGE + "
        "MADV_COLLAPSE, Linux 6.1+; the bytes stay in place): scattered block copies run "
        "faster. auto: on a background thread after registration (copies before it ends run "
        "on the pages they find); on: before registration returns; off: never. Where the "
        "kernel refuses, logged once, 4 KiB pages")
    probe_timeout_s: float = Field(
        0.5, gt=0, le=60, description="longest a match waits for shared tiers (S3, peers) to say "
        "which blocks other instances wrote; a later answer counts as misses")
    background_yield_ms: float = Field(
        200, ge=0, le=60000, description="longest each part of the write-through cascade "
        "(an S3 batch: its requests together) waits for the loads and saves in flight (the "
        "request path goes first on the CPUs, memory bus, disk and network); 0: the cascade "
        "never waits")
    close_timeout_s: float = Field(
        5.0, ge=0, le=3600, description="longest close() waits for the write-through cascade; "
        "blocks still on their way down then are not stored below")
    metrics: bool = False
    metrics_port: int = Field(6880, ge=0, lt=65536)
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint binds")
    kv_events: KvEventsConfig = Field(default_factory=KvEventsConfig)
    leader_worker_init_timeout_secs: float = Field(120, gt=0, le=86400)

    _config_file: str | None = None

    @field_validator("page_size")
    @classmethod
    def _page_size(cls, v: int) -> int:
        if v & (v - 1) and v % PAGE_SIZE_MULTIPLE:
            raise ValueError(
                f"must be a power of two (8, 16, 32, 64 ...; vLLM's default is 16) or a multiple "
                f"of {PAGE_SIZE_MULTIPLE} (as vLLM sizes hybrid models' pages); give the engine's "
                "block size")
        return v

    @field_validator("lora_name", "cache_salt", "metrics_host")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        return _check_text(v)

    @model_validator(mode="after")
    def _whole(self) -> KvbmSettings:
        if self.tp_rank >= self.tp_size:
            raise ValueError(f"key 'tp_rank': value {self.tp_rank}: must be below tp_size "
                             f"({self.tp_size}); ranks count from 0")
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tiers):
            if t.name is None:
                continue
            if t.name in seen:
                raise ValueError(
                    f"key 'tiers.{i}.name': value {t.name!r}: tier {seen[t.name]} has that name "
                    "too; give each tier its own name")
            seen[t.name] = i
        return self

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
        path = _CONFIG_PATH.get()
        origin = ""
        if path is None and os.environ.get("KVBM_CONFIG"):
            path, origin = os.environ["KVBM_CONFIG"], " (KVBM_CONFIG)"
        return (init_settings, env_settings,
                _FileAndDynamoSource(settings_cls, path, origin, _TIER_TYPES.get()))

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

# An example value per settings key that takes JSON from the environment.
_JSON_EXAMPLES = {
    "tiers": '[{"type": "host", "capacity": "4GiB"}]',
    "model": '{"name": "llama-3-8b", "num_layers": 32}',
    "kv_events": '{"enabled": true}',
}


def _env_source(loc: tuple[Any, ...]) -> str | None:
    """The variable a settings value at ``loc`` came from, if one is set: ``KVBM_*``
    (they win over the file), else Dynamo's (folded into the file's values)."""
    names = [str(p).upper() for p in loc if not isinstance(p, int)]
    env = {k.upper() for k in os.environ}
    for n in range(len(names), 0, -1):
        var = "KVBM_" + "__".join(names[:n])
        if var in env:
            return var
    dyn = DYNAMO_KEYS.get(str(loc[0])) if loc else None
    return dyn if dyn is not None and dyn in os.environ else None


def _settings_error(e: SettingsError) -> ConfigError:
    """A pydantic-settings parse error (JSON in a ``KVBM_*`` variable) as one line; the
    value is not shown (it may hold credentials)."""
    m = re.search(r'field "([^"]+)"', str(e))
    field_name = m.group(1) if m else "?"
    var = f"KVBM_{field_name.upper()}"
    cause = e.__cause__ or e.__context__
    if isinstance(cause, json.JSONDecodeError):
        why = f"not valid JSON ({cause.msg} at character {cause.pos + 1})"
    else:
        why = f"cannot be read ({cause or e})"
    example = _JSON_EXAMPLES.get(field_name)
    fix = f"; give JSON, e.g. {var}='{example}'" if example else ""
    return ConfigError(f"environment variable {var}: {why}{fix}")


def load_settings(
    config: str | os.PathLike[str] | dict[str, Any] | KvbmSettings | None = None,
    *,
    tier_types: TierDeclarations | None = None,
    **overrides: Any,
) -> KvbmSettings:
    """Build settings from a YAML path, a dict, or nothing (env and defaults).

    ``tier_types`` (a built ``Plugins.tiers``) supplies the tier plugins' declarations
    (environment aliases, default chain, order); without it the installed plugins are
    read. Raises ``ConfigError``, one line naming every problem by key.
    """
    if isinstance(config, KvbmSettings):
        return config.model_copy(update=overrides) if overrides else config
    if config is not None and not isinstance(config, (str, os.PathLike, dict)):
        raise ConfigError(
            f"config: a {type(config).__name__} is not a config; give the path of a YAML file, "
            "a dict of settings, KvbmSettings, or None (environment and defaults)")
    try:
        if isinstance(config, dict):
            given = {**config, **overrides}
            data = apply_dynamo_env(given, dict(os.environ), tier_types)
            if "tiers" not in given:
                # The chain then comes from KVBM_TIERS, or KVBM_CONFIG's file, or the
                # default chain, as with no config at all; init arguments would beat them.
                del data["tiers"]
            types_token = _TIER_TYPES.set(tier_types)
            try:
                return KvbmSettings(**data)
            finally:
                _TIER_TYPES.reset(types_token)
        token = _CONFIG_PATH.set(None if config is None else os.fspath(config))
        types_token = _TIER_TYPES.set(tier_types)
        try:
            return KvbmSettings(**overrides)
        finally:
            _TIER_TYPES.reset(types_token)
            _CONFIG_PATH.reset(token)
    except ValidationError as e:
        raise ConfigError(
            format_validation_error(e, model=KvbmSettings, source_of=_env_source)) from None
    except SettingsError as e:
        raise _settings_error(e) from None


def is_generated_name(name: str, tier_type: str) -> bool:
    """Whether ``name`` is one ``tier_names`` made for an unnamed tier of ``tier_type``
    that repeats the type (``host1``): a tier class refusing repeats tells a slip from
    a tier the config named on purpose."""
    return name.startswith(tier_type) and name[len(tier_type):].isdigit()


def tier_names(specs: list[TierSpec]) -> list[str]:
    """Each tier's name: its own, else its type, numbered when a type repeats.

    A name given twice, or given to one tier while another tier's type is that name,
    is a ``ConfigError``: metrics, events and logs would mix the two tiers.
    """
    given = {s.name: i for i, s in enumerate(specs) if s.name is not None}
    for i, s in enumerate(specs):
        j = next((j for j, o in enumerate(specs) if o.name is None and o.type == s.name), None)
        if s.name is not None and j is not None:
            raise ConfigError(
                f"tier {i}: key 'name': value {s.name!r}: tier {j} (type {specs[j].type}) goes "
                "by that name, having none of its own; give each tier its own name")
    names: list[str] = []
    for i, s in enumerate(specs):
        if s.name is not None:
            names.append(s.name)
            continue
        name, n = s.type, i
        while name in names or name in given:
            name = f"{s.type}{n}"
            n += 1
        names.append(name)
    return names


def _tier_env_source(ttype: str, loc: tuple[Any, ...]) -> str | None:
    """The variable that set a tier key at ``loc``, if any: ``KVBM_TIERS`` (which sets
    the whole chain) or an environment alias (``DYN_KVBM_*``)."""
    key = ".".join(str(p) for p in loc)
    env = os.environ
    if "KVBM_TIERS" in env:
        return "KVBM_TIERS"
    try:
        decls = _declared_types(env).declarations()
    except Exception:  # only a better message is at stake
        return None
    for d in decls:
        if d.type != ttype:
            continue
        for var, alias in d.env.items():
            if var in env and (alias.key == key or key in alias.also):
                return var
    return None


def validate_tier(spec: TierSpec, name: str, config_model: type[TierConfig]) -> TierConfig:
    """Step two: the tier's own model checks its keys; errors name the tier."""
    data = spec.model_dump()
    data["name"] = name
    try:
        cfg = config_model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(
            e, prefix=f"tier {name!r} (type {spec.type}): ", model=config_model,
            source_of=lambda loc: _tier_env_source(spec.type, loc))) from None
    return cfg


def validate_tiers(specs: list[TierSpec], names: list[str], tier_types: Any) -> list[TierConfig]:
    """Step two for the whole chain: every tier's type and keys checked, and every
    tier's errors raised at once, as one ``ConfigError`` line (``; ``-joined, in chain
    order), so a user fixes all of them in one pass. ``tier_types`` is the plugins'
    tier registry (``plugins.tiers``)."""
    configs: list[TierConfig] = []
    errors: list[str] = []
    known = ", ".join(tier_types.names()) or "none"
    for spec, name in zip(specs, names):
        if spec.type not in tier_types:
            errors.append(f"tier {name!r}: key 'type': value {spec.type!r} is not a known tier "
                          f"type; known: {known} (see `kvbm plugins`)")
            continue
        model = tier_types.get(spec.type).config_model
        assert model is not None
        try:
            configs.append(validate_tier(spec, name, model))
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return configs

"""kvbm: a KV-cache block manager for LLM inference.

Keep the KV of finished prompt blocks in a chain of tiers (GPU, host DRAM, disk,
S3, remote peers) and hand it back when a later prompt shares the prefix.
"""

from .config import KvbmSettings, ModelConfig, TierConfig, load_settings
from .errors import ConfigError, KvbmError, LayoutError, PluginError, TokenError
from .events import BlockEvent, EventBus, EventKind, LogSink
from .hashing import BlockHasher, Namespace, SequenceHash, dynamo_sequence_hashes
from .hookspecs import hookimpl
from .layout import BlockLayout, ContiguousBlocks, LayerSeparateBlocks, ModelSpec
from .manager import KvBlockManager, Match, OffloadResult, OnboardResult
from .plugins import build_plugins
from .policy import AdmissionPolicy, EvictionPolicy
from .registry import BlockRegistry
from .tier import Tier, TierContext

__all__ = [
    "AdmissionPolicy",
    "BlockEvent",
    "BlockHasher",
    "BlockLayout",
    "BlockRegistry",
    "ConfigError",
    "ContiguousBlocks",
    "EventBus",
    "EventKind",
    "EvictionPolicy",
    "KvBlockManager",
    "KvbmError",
    "KvbmSettings",
    "LayerSeparateBlocks",
    "LayoutError",
    "LogSink",
    "Match",
    "ModelConfig",
    "ModelSpec",
    "Namespace",
    "OffloadResult",
    "OnboardResult",
    "PluginError",
    "SequenceHash",
    "Tier",
    "TierConfig",
    "TierContext",
    "TokenError",
    "build_plugins",
    "dynamo_sequence_hashes",
    "hookimpl",
    "load_settings",
]
__version__ = "0.1.0"

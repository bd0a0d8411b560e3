"""kvbm's eviction policies and admission filters, and the simulator that ranks them."""

from .adaptive import AdaptivePolicy
from .admission import FrequencyFilter, PriorityPrefixFilter, ReuseWindowFilter, SketchFilter
from .eviction import ARCPolicy, LFUPolicy, LIRSPolicy, PriorityLRUPolicy, S3FIFOPolicy
from .prefix import PrefixLRUPolicy
from .sketch import FrequencySketch
from .tinylfu import WTinyLFUPolicy

__all__ = [
    "ARCPolicy",
    "AdaptivePolicy",
    "FrequencyFilter",
    "FrequencySketch",
    "LFUPolicy",
    "LIRSPolicy",
    "PrefixLRUPolicy",
    "PriorityLRUPolicy",
    "PriorityPrefixFilter",
    "ReuseWindowFilter",
    "S3FIFOPolicy",
    "SketchFilter",
    "WTinyLFUPolicy",
]

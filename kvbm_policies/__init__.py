"""kvbm's eviction policies and admission filters, and the simulator that ranks them."""

from .admission import FrequencyFilter, PriorityPrefixFilter
from .eviction import ARCPolicy, LFUPolicy, LIRSPolicy, PriorityLRUPolicy, S3FIFOPolicy

__all__ = [
    "ARCPolicy",
    "FrequencyFilter",
    "LFUPolicy",
    "LIRSPolicy",
    "PriorityLRUPolicy",
    "PriorityPrefixFilter",
    "S3FIFOPolicy",
]

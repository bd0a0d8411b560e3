"""kvbm's eviction policies and admission filters."""

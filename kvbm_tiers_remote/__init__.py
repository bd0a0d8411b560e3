"""kvbm's remote tier plugin."""

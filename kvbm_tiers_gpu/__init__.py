"""kvbm's gpu tier plugin."""

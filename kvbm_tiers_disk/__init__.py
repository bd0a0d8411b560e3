"""kvbm's disk tier plugin."""

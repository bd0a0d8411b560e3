"""kvbm's host (pinned DRAM) tier plugin."""

"""kvbm's s3 tier plugin."""

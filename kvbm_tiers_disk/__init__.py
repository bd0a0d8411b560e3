"""kvbm's disk tier plugin: O_DIRECT slot files that survive a restart."""

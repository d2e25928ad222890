"""Hydra config tree (a package so Hydra can find it as a config module)."""

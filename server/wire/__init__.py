"""Typed messages between router and workers and their one msgpack codec (no pickle, ever)."""

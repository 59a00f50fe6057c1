"""Mesh, logical-axis rules, shard_map helpers and the multi-process start.

Imports nothing else from the package but registry.ConfigError (a leaf module).
"""

"""Mesh, logical-axis rules and sharding helpers. Imports nothing else from the package."""

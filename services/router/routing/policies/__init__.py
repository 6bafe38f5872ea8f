"""Routing policies: one file each, created by name through ``factory.create_policy``."""

"""Role rebalancing policies: one file each, created by name through ``factory.create_rebalance_policy``."""

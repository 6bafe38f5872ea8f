"""Running a request on workers: the worker pool, routing policies, the orchestrator (mixed and PD), retries, migration, poison requests."""

"""The gateway's HTTP API bodies as pydantic models: they validate requests and generate /openapi.json."""

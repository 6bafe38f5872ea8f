"""The HTTP APIs: OpenAI, Anthropic, vLLM's tokenizer endpoints and the admin API; their request/response models (protocol/) and /openapi.json."""

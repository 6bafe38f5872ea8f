"""The router: HTTP gateway (OpenAI + Anthropic APIs), worker discovery and routing."""

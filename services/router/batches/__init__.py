"""The Batch APIs (OpenAI batches, Anthropic message batches): files, durable state, the executor."""

"""The kvstore process: the global KV index (which worker holds which KV blocks, in which
tier) beside the Mooncake Store master it supervises."""

"""Prefill role. A prefill worker is the common worker process holding role ``prefill``;
its KV-push logic arrives with the PD issue."""

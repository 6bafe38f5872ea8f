"""Decode role. A decode worker is the common worker process holding role ``decode``;
its KV-receive logic arrives with the PD issue."""

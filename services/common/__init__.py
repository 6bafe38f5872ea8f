"""Code shared by every epdserve process: config helpers, etcd membership, gRPC helpers."""

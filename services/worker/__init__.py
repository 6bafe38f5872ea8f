"""The worker process: one engine behind a gRPC server, holding a role, registered in etcd."""

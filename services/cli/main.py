"""The `epdserve` command: up | worker | router | kvstore | generate | bench | status | roles |
drain | rebalance | policy | experts | models | poison | batches."""

from __future__ import annotations

import argparse
import importlib.util
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from services.cli.admin_config import COMMANDS

    if argv and argv[0] in COMMANDS:
        # NOTE: before importing `up` (which pulls in torch): operator commands answer in
        # a fraction of a second, scripts and tests poll them.
        from services.cli import admin

        return admin.main(argv)
    if argv and argv[0] == "batches":
        from services.cli import batches

        return batches.main(argv[1:])
    parser = argparse.ArgumentParser(prog="epdserve", description="epdserve LLM serving cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="run a whole local cluster")
    if argv and argv[0] == "up":
        # Only then: `epdserve --help` and the other commands skip up's imports (~1 s).
        from services.cli import up

        up.add_arguments(up_parser)
    # worker/router own their parsers (built from their config dataclasses): pass through.
    sub.add_parser("worker", help="run one worker process", add_help=False)
    sub.add_parser("router", help="run the router / HTTP gateway", add_help=False)
    sub.add_parser(
        "kvstore", help="run the global KV index and its Mooncake master", add_help=False
    )
    has_generate = importlib.util.find_spec("services.cli.generate") is not None
    if has_generate:
        sub.add_parser("generate", help="generate text offline with the engine", add_help=False)
    sub.add_parser("bench", help="benchmark a running server", add_help=False)
    admin_help = {
        "status": "show workers, roles, load and the rebalancer",
        "roles": "show workers' roles and the roles each can take, or set one (roles set ID ROLE)",
        "drain": "stop sending a worker new requests",
        "rebalance": "run one rebalancing round now",
        "policy": "choose the rebalancing policy (policy set NAME)",
        "experts": "re-place an MoE worker's experts from its load (experts rebalance ID)",
        "models": "put a worker's model to sleep, wake it, or load another (models sleep|wake|load ID)",
        "poison": "list the requests refused as poison, or serve them again (poison clear [FP])",
    }
    for name in COMMANDS:
        sub.add_parser(name, help=admin_help[name], add_help=False)
    sub.add_parser("batches", help="list, show or cancel batch jobs", add_help=False)

    if argv and argv[0] in ("worker", "router", "kvstore"):
        from services.common.grpc_io import use_poller_io

        use_poller_io()  # before their imports bring grpc in (common/grpc_io.py)
    if argv and argv[0] == "worker":
        from services.worker import starting  # before the heavy imports: worker/starting.py

        announced = starting.announce(argv[1:])
        from services.worker.main import main as worker_main

        return worker_main(argv[1:], handover=announced)
    if argv and argv[0] == "router":
        from services.router.main import main as router_main

        return router_main(argv[1:])
    if argv and argv[0] == "kvstore":
        from services.kvstore.main import main as kvstore_main

        return kvstore_main(argv[1:])
    if argv and argv[0] == "generate" and has_generate:
        from services.cli import generate

        return int(generate.main(argv[1:]) or 0)
    if argv and argv[0] == "bench":
        from services.cli import bench

        return bench.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "up":
        from services.cli import up

        return up.run(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

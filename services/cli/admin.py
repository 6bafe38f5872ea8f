"""Operator commands over the router's admin API: status, roles set, drain, rebalance, policy,
experts, models, poison.

    epdserve status [--json]
    epdserve roles [list]
    epdserve roles set ID ROLE
    epdserve drain ID [--undo]
    epdserve rebalance [--dry-run]
    epdserve policy set NAME [--param k=v ...]
    epdserve experts rebalance ID [--slots N] [--placement FILE]
    epdserve poison [list]
    epdserve poison clear [FINGERPRINT]

Common flags: ``--router URL`` (or EPDSERVE_ROUTER), ``--admin-token`` (or EPDSERVE_ADMIN_TOKEN);
a cluster started by `epdserve up` needs neither (see admin_config.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from services.cli.admin_config import resolve_router, resolve_token
from services.cli.admin_render import flipped, render_roles, render_status
from services.common.grpc_utils import ROLES

HTTP_TIMEOUT_S = 30.0  # a role change answers at once; the worker converges afterwards
EXPERTS_TIMEOUT_S = 660.0  # a re-placement reads the experts again (the router waits 600 s)
# A sleep answers once the worker drained and gave its memory back (the router waits up to
# admin.SLEEP_RPC_TIMEOUT_S for that).
SLEEP_TIMEOUT_S = 660.0
# A model load answers once the worker serves the new model (the router waits up to
# admin_models.SLEEP_RPC_TIMEOUT_S for the drain, then LOAD_WAIT_S for the restart).
LOAD_TIMEOUT_S = 1260.0


class AdminCallError(Exception):
    """The admin API answered an error (or could not be reached)."""


def call(
    router: str,
    token: str | None,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = HTTP_TIMEOUT_S,
) -> dict:
    """``method`` ``path`` (already quoted: ``quoted``) on the router; its JSON answer, or
    AdminCallError for anything that is not one (never a traceback: a bad --router URL, an
    unreachable router, a server that does not speak HTTP or JSON)."""
    data = None if body is None else json.dumps(body).encode()
    try:
        req = urllib.request.Request(router + path, data=data, method=method)
    except ValueError as e:  # no http:// scheme
        raise AdminCallError(f"bad router URL {router!r}: {e}") from None
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = e.reason
        raise AdminCallError(f"{e.code}: {msg}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        # HTTPException: InvalidURL (a port that is not a number), BadStatusLine, ...
        raise AdminCallError(f"cannot reach the router at {router}: {e}") from None
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        raise AdminCallError(f"the router at {router} answered {raw[:80]!r}, not JSON") from None


def quoted(*segments: str) -> str:
    """A URL path of ``segments``, each percent-quoted whole: a worker or batch id may hold a
    space, '?', '#', '%' or '/' (http.client refused the unquoted path with InvalidURL)."""
    return "".join("/" + urllib.parse.quote(s, safe="") for s in segments)


def worker_path(worker_id: str, action: str) -> str:
    """The admin API path of ``action`` on one worker."""
    return quoted("admin", "workers", worker_id, action)


def build_parser(prog: str = "epdserve") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--router", default=None, help="router URL (default: EPDSERVE_ROUTER, "
                        "the cluster `epdserve up` started, or http://127.0.0.1:8000)")  # fmt: skip
    common.add_argument("--admin-token", default=None,
                        help="admin token (default: EPDSERVE_ADMIN_TOKEN or `epdserve up`'s)")  # fmt: skip
    common.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    p = argparse.ArgumentParser(prog=prog, description="Operate an epdserve cluster.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="workers, roles, load and the rebalancer")
    roles = sub.add_parser("roles", help="show workers' roles and the roles each can take "
                           "(roles [list]), or set one (roles set ID ROLE)")  # fmt: skip
    # NOTE: not a parent of `roles` itself: argparse lets a subcommand's defaults overwrite
    # the parent's flags. Plain `epdserve roles` lists, with the default router and token.
    roles.set_defaults(router=None, admin_token=None, json=False)
    roles_sub = roles.add_subparsers(dest="action")
    roles_sub.add_parser(
        "list", parents=[common], help="workers, their roles, the roles each can take"
    )
    rs = roles_sub.add_parser("set", parents=[common], help="move a worker to a role")
    rs.add_argument("id", help="worker id, as `epdserve status` shows it")
    rs.add_argument("role", choices=ROLES)
    dr = sub.add_parser("drain", parents=[common], help="stop sending a worker new requests")
    dr.add_argument("id", help="worker id")
    dr.add_argument("--undo", action="store_true", help="put a drained worker back in service")
    rb = sub.add_parser("rebalance", parents=[common], help="run one rebalancing round now")
    rb.add_argument("--dry-run", action="store_true", help="decide, but change nothing")
    pol = sub.add_parser("policy", help="choose the rebalancing policy")
    pol_sub = pol.add_subparsers(dest="action", required=True)
    ps = pol_sub.add_parser("set", parents=[common], help="set the policy and its parameters")
    ps.add_argument("name", help="static | queue | slo")
    ps.add_argument("--param", action="append", default=[], metavar="K=V",
                    help="a policy parameter (repeatable)")  # fmt: skip
    ex = sub.add_parser("experts", help="expert load balancing of an MoE worker (EPLB)")
    ex_sub = ex.add_subparsers(dest="action", required=True)
    er = ex_sub.add_parser("rebalance", parents=[common], help="re-place a worker's experts "
                           "between two steps, from its recorded load")  # fmt: skip
    er.add_argument("id", help="worker id (expert parallelism: TP > 1, --enable-expert-parallel)")
    er.add_argument("--slots", type=int, default=0,
                    help="physical experts per layer (more than the experts replicates the "
                    "hottest); default: as many as now")  # fmt: skip
    er.add_argument("--placement", metavar="FILE", default=None,
                    help="apply this placement (an --eplb-placement file) instead")  # fmt: skip
    poison = sub.add_parser("poison", help="the requests this router refuses as poison "
                            "(poison [list]), or serve them again (poison clear [FP])")  # fmt: skip
    poison.set_defaults(router=None, admin_token=None, json=False)  # see `roles`
    poison_sub = poison.add_subparsers(dest="action")
    poison_sub.add_parser("list", parents=[common], help="request fingerprints refused, how long")
    pc = poison_sub.add_parser("clear", parents=[common], help="serve refused requests again")
    pc.add_argument("fingerprint", nargs="?", default=None,
                    help="as the poison_request error names it (default: every one)")  # fmt: skip
    models = sub.add_parser("models", help="sleep or wake a worker's model, or load another")
    models_sub = models.add_subparsers(dest="action", required=True)
    for action, text in (
        ("sleep", "drain a worker, then free its weights and KV memory"),
        ("wake", "load a sleeping worker's weights back; it serves again"),
        (
            "load",
            "drain a worker, then restart it with another model (its old model's "
            "requests go to that model's other workers)",
        ),
    ):
        ms = models_sub.add_parser(action, parents=[common], help=text)
        ms.add_argument("id", help="worker id, as `epdserve status` shows it")
        if action == "load":
            ms.add_argument(
                "--model",
                required=True,
                help="a Hugging Face folder or .gguf file on the worker's disk",
            )
            ms.add_argument(
                "--served-model-name",
                default="",
                help="the name clients ask for (default: the folder's name)",
            )
    return p


def _models(router: str, token: str | None, args: argparse.Namespace) -> tuple[dict, str]:
    if args.action == "load":
        body = {"model": args.model, "served_model_name": args.served_model_name}
        path = worker_path(args.id, "model")
        r = call(router, token, "POST", path, body, timeout=LOAD_TIMEOUT_S)
        return r, (f"{r['id']}: serves {r['model']} (was {r['previous_model']}; drained in "
                   f"{r['drain_seconds']:.1f}s, serving after {r['seconds']:.1f}s)")  # fmt: skip
    body = {"sleep": args.action == "sleep"}
    r = call(router, token, "POST", worker_path(args.id, "sleep"), body, timeout=SLEEP_TIMEOUT_S)
    mib = (r["weight_bytes"] + r["kv_bytes"]) / 2**20
    done = f"asleep: {mib:.0f} MiB given back" if r["sleeping"] else "awake: serving again"
    return r, f"{r['id']} ({r['model']}): {done} ({r['seconds']:.1f}s)"


def _experts(router: str, token: str | None, args: argparse.Namespace) -> tuple[dict, str]:
    body: dict[str, Any] = {"num_slots": args.slots}
    if args.placement:
        try:
            with open(args.placement) as f:
                body["placement"] = json.load(f)
        except (OSError, ValueError) as e:
            raise AdminCallError(f"cannot read the placement {args.placement}: {e}") from None
    path = worker_path(args.id, "experts")
    r = call(router, token, "POST", path, body, timeout=EXPERTS_TIMEOUT_S)
    layers = ", ".join(f"{b:.2f} -> {a:.2f}"
                       for b, a in zip(r["imbalance_before"], r["imbalance_after"], strict=True))  # fmt: skip
    saved = f"; saved to {r['saved_to']}" if r["saved_to"] else ""
    return r, (f"{r['id']}: experts re-placed; max/mean tokens per rank by sparse layer: "
               f"{layers}{saved}")  # fmt: skip


def _poison(router: str, token: str | None, args: argparse.Namespace) -> tuple[dict, str]:
    if args.action == "clear":
        fp = [args.fingerprint] if args.fingerprint else []
        r = call(router, token, "DELETE", quoted("admin", "poison", *fp))
        return r, f"{r['forgotten']} refused request fingerprint(s) forgotten: served again"
    r = call(router, token, "GET", "/admin/poison")
    rows = [f"{fp}  refused for {left:.0f} s more" for fp, left in sorted(r["refused"].items())]
    return r, "\n".join(rows) or (
        f"no request refused (a request is poison once {r['max_deaths']} workers died running "
        f"it; its identical requests are then refused for {r['ttl_s']:g} s)"
    )


def run(args: argparse.Namespace) -> tuple[dict, str]:
    """(JSON answer, human text) of one command."""
    router, token = resolve_router(args.router), resolve_token(args.admin_token)
    if args.command == "status":
        st = call(router, token, "GET", "/admin/status")
        return st, render_status(st)
    if args.command == "roles" and args.action != "set":
        st = call(router, token, "GET", "/admin/status")
        return {"workers": st["workers"]}, render_roles(st)
    if args.command == "roles":
        r = call(router, token, "POST", worker_path(args.id, "role"), {"role": args.role})
        return r, (f"{r['id']}: {r['previous_role']} -> {r['role']} requested; the worker "
                   f"drains and switches (see `epdserve status`)")  # fmt: skip
    if args.command == "drain":
        body = {"drain": not args.undo}
        r = call(router, token, "POST", worker_path(args.id, "drain"), body)
        state = "draining" if r["draining"] else "serving"
        return r, f"{r['id']}: {state} ({r['inflight']} requests in flight)"
    if args.command == "rebalance":
        r = call(router, token, "POST", "/admin/rebalance", {"dry_run": args.dry_run})
        d = r["decision"]
        who = flipped(d)
        tag = " (dry run: nothing changed)" if args.dry_run else ""
        inputs = ", ".join(f"{k}={v:g}" for k, v in sorted(d["inputs"].items()))
        return r, f"{d['policy']}: {d['action']}{who}: {d['reason']}{tag}\ninputs: {inputs or '-'}"
    if args.command == "policy":
        params = {}
        for item in args.param:
            key, sep, value = item.partition("=")
            if not sep:
                raise AdminCallError(f"--param {item!r} is not k=v")
            params[key] = value
        r = call(router, token, "POST", "/admin/policy", {"name": args.name, "params": params})
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(r["params"].items()))
        return r, f"rebalance policy: {r['policy']} ({shown or 'no parameters'})"
    if args.command == "experts":
        return _experts(router, token, args)
    if args.command == "models":
        return _models(router, token, args)
    if args.command == "poison":
        return _poison(router, token, args)
    raise AdminCallError(f"unknown command {args.command}")


def main(argv: list[str], prog: str = "epdserve") -> int:
    return answer(build_parser(prog).parse_args(argv), run)


def answer(
    args: argparse.Namespace, command: Callable[[argparse.Namespace], tuple[Any, str]]
) -> int:
    """Run ``command``; print its text (its JSON with ``--json``) or its error; exit code."""
    try:
        result, text = command(args)
    except AdminCallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else text)
    return 0

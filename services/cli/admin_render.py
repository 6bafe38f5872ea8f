"""How `epdserve status` and `epdserve roles` print the router's answer: tables per model,
the held requests, the KV index, the tiers and the rebalancer (admin.py runs the commands)."""

from __future__ import annotations

import time
from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _count(ids: list[str] | None) -> str:
    return "-" if ids is None else str(len(ids))


def render_kvstore(kv: dict) -> str:
    """One line on the global KV index: where, healthy, size, hit rate."""
    head = f"kvstore {kv['id']} at {kv['address']}"
    if not kv.get("healthy"):
        return f"{head}: UNREACHABLE ({kv.get('error', 'no answer')})"
    master = "up" if kv["master_alive"] else "DOWN"
    return (
        f"{head}: {kv['blocks']}/{kv['capacity_blocks']} blocks indexed "
        f"({kv['store_blocks']} in Mooncake Store) from {kv['instances']} workers, "
        f"hit rate {kv['hit_rate'] * 100:.1f}% over {kv['lookups']} lookups; "
        f"master {kv['master'] or '-'} {master}, {kv['master_restarts']} restarts"
    )


def _speculation(w: dict) -> str:
    """Speculative decoding: drafts accepted and tokens per verification ("62%x2.1"), "-"
    on a worker that has not speculated."""
    spec = w.get("speculation")
    if not spec:
        return "-"
    return f"{spec['acceptance_rate'] * 100:.0f}%x{spec['mean_accepted_length']:.1f}"


def _images(w: dict) -> str:
    """An encoder's backlog: images waiting + in the vision tower ("-" on other roles)."""
    if w["role"] != "encode" or w.get("images_waiting") is None:
        return "-"
    return str(w["images_waiting"] + w["images_encoding"])


def _offline(w: dict) -> str:
    """A worker's offline (flex) sequences: waiting/running in its engine."""
    if w.get("offline_waiting") is None:
        return "-"
    return f"{w['offline_waiting']}/{w['offline_running']}"


def _step(w: dict) -> str:
    """The engine's fitted step cost, "fixed+per_token" in wall ms ("-" before a fit)."""
    if not w.get("step_token_ms"):
        return "-"
    return f"{w['step_fixed_ms']:.0f}+{w['step_token_ms']:.2f}"


def _role(w: dict) -> str:
    """Its role, with the role it is moving to when a desired role differs."""
    return w["role"] if w["desired_role"] == w["role"] else f"{w['role']}->{w['desired_role']}"


def _state(w: dict) -> str:
    """Its state, with how long it has been so where the router knows ("unreachable 12s")."""
    return w["state"] if w.get("for_s") is None else f"{w['state']} {w['for_s']:.0f}s"


def render_gone(gone: list[dict]) -> list[str]:
    """Lines on the workers that left the router's view, with how long ago."""
    return [f"  {g['id']} ({g['role']}, {g['model']}, {g['address']}, pid {g['pid']} on "
            f"{g['host']}): gone for {g['for_s']:.0f}s" for g in gone]  # fmt: skip


def render_starting(starting: list[dict]) -> list[str]:
    """Lines on the workers that are starting (loading their model, not serving yet)."""
    return [f"  {s['id']} ({s['role']}, {s['model']}, pid {s['pid']} on {s['host']}): "
            f"starting for {s['for_s']:.0f}s" for s in starting]  # fmt: skip


def flipped(d: dict) -> str:
    """The worker a rebalancing decision names and the role it goes to, as " ID -> ROLE"."""
    if not d["worker_id"]:
        return ""
    return f" {d['worker_id']}" + (f" -> {d['target_role']}" if d.get("target_role") else "")


def render_roles(st: dict) -> str:
    """One line per worker: its role (and the one it is moving to), and the roles it can take."""
    rows = [["ID", "ROLE", "EPOCH", "STATE", "MODEL", "CAN_TAKE"]]
    for w in st["workers"]:
        rows.append([w["id"], _role(w), str(w["epoch"]), w["state"], w["model"],
                     ",".join(w.get("can_take") or []) or "-"])  # fmt: skip
    return table(rows)


def render_status(st: dict) -> str:
    head = ["ID", "ROLE", "EPOCH", "STATE", "ADDRESS", "WAIT", "RUN", "REQS", "QUEUED_TOK",
            "KV%", "IMAGES", "TTFT_MS", "TPOT_MS", "ONLINE_TTFT", "ONLINE_TPOT", "OFFLINE_W/R",
            "STEP_MS", "SPEC", "PID", "HOST"]  # fmt: skip
    held: list[str] = []
    failed: list[str] = []  # workers whose last model load failed
    tables: dict[str, list[list[str]]] = {}  # one table per base model
    for w in st["workers"]:
        rows = tables.setdefault(w.get("model") or "?", [head])
        role = _role(w)
        kv = None if w["kv_utilization"] is None else w["kv_utilization"] * 100
        rows.append([w["id"], role, str(w["epoch"]), _state(w), w["address"],
                     _fmt(w["waiting"]), _fmt(w["running"]), _count(w.get("requests")),
                     _fmt(w["waiting_prompt_tokens"]), _fmt(kv), _images(w), _fmt(w["ttft_ms"]),
                     _fmt(w["tpot_ms"]), _fmt(w.get("online_ttft_ms")),
                     _fmt(w.get("online_tpot_ms")), _offline(w), _step(w), _speculation(w), _fmt(w["pid"]),
                     _fmt(w["host"])])  # fmt: skip
        ids = [*(w.get("requests") or []), *(f"{r} (reserved)" for r in w.get("reserved") or [])]
        if ids:
            held.append(f"  {w['id']} (pid {w['pid']} on {w['host']}): {', '.join(ids)}")
        if w.get("load_error"):
            failed.append(f"  {w['id']} serves {w['model']} again: {w['load_error']}")
    rb = st["rebalancer"]
    params = ", ".join(f"{k}={v:g}" for k, v in sorted(rb["params"].items())) or "no parameters"
    out = [f"cluster {st['cluster']}: {len(st['workers'])} workers"]
    for model, rows in sorted(tables.items()):
        out += [f"model {model}: {len(rows) - 1} workers", table(rows), ""]
    if st.get("starting"):
        out += ["workers starting:", *render_starting(st["starting"]), ""]
    if st.get("gone"):
        out += ["workers gone:", *render_gone(st["gone"]), ""]
    if held:
        out += ["requests held:", *held, ""]
    if failed:
        out += ["model loads that failed (epdserve models load):", *failed, ""]
    kv = st.get("kvstore") or {}
    if kv.get("present"):
        out.append(render_kvstore(kv))
    if "router" in st:
        r = st["router"]
        out.append(f"answered by router {r['id']} (pid {r['pid']} on {r['host']})")
    if "tiers" in st:
        on, off = st["tiers"]["online"], st["tiers"]["offline"]
        out.append(
            f"online: {on['queued_prompt_tokens']} of {on['max_queued_tokens']} prompt tokens "
            f"admitted; offline (flex): {off['waiting']} waiting, {off['running']} running, "
            f"{off['queued_prompt_tokens']} prompt tokens; online TTFT {off['online_ttft_ms']} ms, "
            f"TPOT {off['online_tpot_ms']} ms: SLOs {'met' if off['slo_met'] else 'missed'}"
        )
    out.append(
        f"rebalancer: policy {rb['policy']} ({params}); every {rb['interval_s']:g}s, "
        f"hysteresis {rb['hysteresis_rounds']} rounds, cooldown {rb['cooldown_s']:g}s, "
        f"max {rb['max_flips']} flips / {rb['flip_window_s']:g}s; "
        f"{'this router leads' if rb['leader'] else 'led by ' + str(rb['leader_id'])}"
    )
    last = rb.get("last_round")
    if last:
        when = time.strftime("%H:%M:%S", time.localtime(last["at"]))
        out.append(f"last round {when}: {last['action']}: {last['reason']}")
    if rb["decisions"]:
        out.append("recent flips (and suppressed flips):")
        for d in rb["decisions"][:10]:
            when = time.strftime("%H:%M:%S", time.localtime(d["at"]))
            who = flipped(d)
            model = f" [{d['model']}]" if d.get("model") else ""
            out.append(f"  {when}{model} {d['policy']} {d['action']}{who}: {d['reason']}")
    elif not last:
        out.append("no decisions yet")
    return "\n".join(out)

"""The role rebalancer: every few seconds, on the router that leads the election, read the
workers' load, ask the policy, let the governor damp it, and write the desired role to etcd.

Each base model's workers are a pool of their own: a round asks the policy about each model's
workers apart (a policy and a governor per model, so smoothing, hysteresis and the minimum per
role never mix two models' workers) and may flip one worker per model.

Every round is logged with its inputs, counted in ``epdserve:rebalance_decisions`` and kept in
``decisions`` (shown by ``epdserve status``). The workers do the flip (drain, switch, epoch+1).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any

from services.common.aio import cancel_and_wait
from services.common.pd_metrics import RebalanceMetrics
from services.common.proto import worker_pb2 as pb
from services.router.rebalance.base import HOLD, RebalancePolicy, WorkerLoad
from services.router.rebalance.factory import create_rebalance_policy
from services.router.rebalance.governor import Decision, Governor, GovernorConfig
from services.router.rebalance.leader import LeaderElection
from services.router.rebalance.role_store import RoleStore, RoleStoreError
from services.router.routing.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


def worker_load(h: WorkerHandle) -> WorkerLoad:
    """The rebalancer's view of one worker (zeros until its first load report): its online
    load only. NOTE: offline (flex) work fills what online work leaves and gives way to it
    (the engine preempts it first), so it must not by itself move a worker to another role.
    That holds for TPOT too: the engine's pace lets offline tokens raise online requests' TPOT
    by design (towards a quantile of their own), so the TPOT it reads leaves out the part of
    the online requests' step time that the engine measured their offline tokens took."""
    r = h.load or pb.LoadReport()
    offline_kv = r.num_offline_blocks / r.num_total_blocks if r.num_total_blocks else 0.0
    tpot = r.recent_online_tpot_ms * (1.0 - min(1.0, max(0.0, r.recent_online_tpot_offline_share)))
    return WorkerLoad(
        id=h.id, role=h.info.role, state=h.state if h.reachable() else "unreachable",
        queued_prefill_tokens=r.num_waiting_prompt_tokens - r.num_offline_waiting_prompt_tokens,
        num_waiting=r.num_waiting - r.num_offline_waiting,
        num_running=r.num_running - r.num_offline_running,
        kv_utilization=max(0.0, r.kv_utilization - offline_kv),
        max_num_seqs=int(h.info.capacity.get("max_num_seqs", 0) or 0),
        recent_ttft_ms=r.recent_online_ttft_ms, recent_tpot_ms=tpot,
        prefill_tokens_per_s=h.prefill_rate.best(),
        can_encode=bool(h.info.capacity.get("encode")),
        images_waiting=r.images_waiting, images_encoding=r.images_encoding,
        recent_encode_ms=r.recent_encode_ms,
    )  # fmt: skip


def leaves_role_empty(roles: dict[str, str], changes: dict[str, str | None]) -> str | None:
    """The role that ``changes`` (worker id -> new role, None: out of service) would leave
    with no worker, among the roles that have one now; None when every role keeps one."""
    after = {**roles, **changes}
    for role in sorted(set(roles.values())):
        if not any(r == role for r in after.values()):
            return role
    return None


class Rebalancer:
    def __init__(
        self,
        pool: WorkerPool,
        store: RoleStore,
        metrics: RebalanceMetrics,
        election: LeaderElection | None,
        policy: str = "static",
        params: dict[str, Any] | None = None,
        governor: GovernorConfig | None = None,
        interval_s: float = 2.0,
    ) -> None:
        self.pool = pool
        self.store = store
        self.metrics = metrics
        self.election = election
        # The configured policy (name, parameters); each model runs a copy of its own.
        self.policy: RebalancePolicy = create_rebalance_policy(policy, **(params or {}))
        self.governor = Governor(governor)  # its cfg is every model's damping
        self._policies: dict[str, RebalancePolicy] = {}  # base model -> its copy of policy
        self._governors: dict[str, Governor] = {}  # base model -> its damping state
        self.interval_s = interval_s
        # Flips and suppressed flips (holds would push them out), newest last; and the
        # latest round whatever it decided.
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=50)
        self.last: Decision | None = None
        self._lock = asyncio.Lock()  # one round at a time (loop and admin API)
        self._task: asyncio.Task[None] | None = None
        self._policy_document: str | None = None  # the etcd policy last adopted

    @property
    def is_leader(self) -> bool:
        return self.election is None or self.election.is_leader

    def set_policy(self, name: str, params: dict[str, Any]) -> None:
        """Swap this router's policy (ValueError on a bad name or parameter); damping state is
        kept. ``publish_policy`` changes it for the whole cluster."""
        self.policy = create_rebalance_policy(name, **params)
        self._policies.clear()
        log.info("rebalance policy is now %s %s", name, self.policy.params())

    async def publish_policy(self, name: str, params: dict[str, Any]) -> None:
        """Check the policy, store it in etcd for every router (RoleStoreError when etcd is
        away: nothing changes), then use it here at once."""
        policy = create_rebalance_policy(name, **params)
        document = json.dumps({"name": name, "params": policy.params()}, sort_keys=True)
        await self.store.set_policy(document)
        self.policy = policy
        self._policies.clear()
        self._policy_document = document
        log.info("rebalance policy is now %s %s (cluster-wide)", name, policy.params())

    async def sync_policy(self) -> None:
        """Adopt the policy stored in etcd when it differs from the one last adopted (another
        router's ``publish_policy``, or the cluster's choice when this router starts). etcd
        away or a bad document: keep the current policy."""
        try:
            document = await self.store.get_policy()
        except RoleStoreError as exc:
            log.debug("rebalance policy not synced: %s", exc)
            return
        if document is None or document == self._policy_document:
            return
        self._policy_document = document
        try:
            doc = json.loads(document)
            self.set_policy(doc["name"], doc["params"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the stored rebalance policy %r: %s", document, exc)

    def serving_roles(
        self, desired: dict[str, str] | None = None, model: str | None = None
    ) -> dict[str, str]:
        """Worker id -> role of the workers in service (not drained, reachable) of ``model``
        (None: every model), where a worker being moved (``desired``: id -> desired role)
        counts with its new role."""
        desired = desired or {}
        return {
            h.id: desired.get(h.id, h.info.role)
            for h in self.pool.handles.values()
            if h.reachable()
            and h.state not in ("draining", "sleeping", "loading")
            and model in (None, h.info.model)
        }

    def _for_model(self, model: str) -> tuple[RebalancePolicy, Governor]:
        if model not in self._policies:
            self._policies[model] = create_rebalance_policy(
                self.policy.name, **self.policy.params()
            )
        governor = self._governors.setdefault(model, Governor(self.governor.cfg))
        return self._policies[model], governor

    async def start(self) -> None:
        if self.election is not None:
            await self.election.start()
        self._task = asyncio.create_task(self._loop(), name="rebalancer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self.election is not None:
            await self.election.stop()
        await self.store.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                # Every router follows the cluster's policy, so that `status` through any of
                # them tells the truth and a new leader goes on with it. One etcd read a round:
                # a policy set through one router shows through the others within a round
                # (it took up to 7 s when read every 5 s).
                await self.sync_policy()
                if self.is_leader:
                    await self.round()
            except Exception:
                log.exception("rebalancing round failed")

    async def round(self, manual: bool = False, dry_run: bool = False) -> Decision:
        """One decision per base model; writes the desired roles unless ``dry_run``. Returns
        the first model's flip (or suppressed flip), else its hold."""
        async with self._lock:
            loads: dict[str, list[WorkerLoad]] = {}
            for h in sorted(self.pool.handles.values(), key=lambda h: h.id):
                loads.setdefault(h.info.model, []).append(worker_load(h))
            decisions = [
                await self._decide(model, loads.get(model, []), manual, dry_run)
                for model in sorted(loads) or [""]
            ]
            chosen = next((d for d in decisions if d.action != HOLD), decisions[0])
            if not dry_run:
                self.last = chosen
            return chosen

    async def _decide(
        self, model: str, loads: list[WorkerLoad], manual: bool, dry_run: bool
    ) -> Decision:
        """One decision among ``model``'s workers (``loads``)."""
        policy, governor = self._for_model(model)
        proposal = policy.propose(loads)
        d = governor.decide(policy.name, proposal, loads, manual=manual, dry_run=dry_run)
        d.model = model
        if d.worker_id is not None and d.target_role is not None and not dry_run:
            try:
                await self.store.set(d.worker_id, d.target_role)
                d.applied = True
            except Exception as exc:
                d.reason += f"; not applied: {exc}"
        log.log(
            logging.INFO if d.action != HOLD else logging.DEBUG,
            "rebalance %s %s: %s%s (%s) inputs=%s%s", model, d.policy, d.action,
            f" {d.worker_id}" if d.worker_id else "", d.reason, d.inputs,
            " [dry run]" if dry_run else "",
        )  # fmt: skip
        if not dry_run:
            self.metrics.decision(d.policy, d.action)
            if d.action != HOLD:
                self.decisions.append(d)
        return d

    def describe(self) -> dict[str, Any]:
        cfg = self.governor.cfg
        return {
            "policy": self.policy.name,
            "params": self.policy.params(),
            "interval_s": self.interval_s,
            "hysteresis_rounds": cfg.hysteresis_rounds,
            "cooldown_s": cfg.cooldown_s,
            "max_flips": cfg.max_flips,
            "flip_window_s": cfg.flip_window_s,
            "leader": self.is_leader,
            "leader_id": self.election.leader if self.election is not None else None,
            "last_round": self.last.to_dict() if self.last is not None else None,
            "decisions": [d.to_dict() for d in reversed(self.decisions)],
        }

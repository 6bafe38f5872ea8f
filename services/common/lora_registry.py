"""The LoRA adapters loaded through the API, kept in etcd so that a worker started later (a
new replica, a restarted one) loads them too.

One key per adapter, ``/epdserve/<cluster>/lora_adapters/<name>``, without a lease (the set
outlives every process), holding ``{"path": ..., "base_model": ...}``. The router writes it
once every worker of the base model has loaded the adapter and deletes it before unloading;
a worker lists it after registering and loads the adapters of its own model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from etcd3aio import Etcd3Client, prefix_range_end

from services.common.etcd_client import ETCD_OP_TIMEOUT_S, EtcdSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRecord:
    path: str  # the PEFT folder, as every worker of the base model sees it
    base_model: str  # the served name of the model it adapts


def _record(name: str, value: bytes) -> AdapterRecord | None:
    """The record of ``name``; None (logged) for a value this version cannot read (another
    version's fields, a hand-written key): it must not hide the other adapters."""
    try:
        fields = json.loads(value)
        return AdapterRecord(path=str(fields["path"]), base_model=str(fields["base_model"]))
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("LoRA adapter record %r unreadable (%r): ignored", name, exc)
        return None


class LoRARegistry:
    """The cluster's API-loaded adapters by name (each call bounded; raises when etcd is away)."""

    def __init__(self, endpoints: list[str], cluster: str) -> None:
        self.session = EtcdSession(endpoints)
        self.prefix = f"/epdserve/{cluster}/lora_adapters/"

    async def get(self, name: str) -> AdapterRecord | None:
        async def get(c: Etcd3Client) -> bytes | None:
            assert c.kv is not None
            resp = await c.kv.get(self.prefix + name, timeout=ETCD_OP_TIMEOUT_S)
            return resp.kvs[0].value if resp.kvs else None

        value = await self.session.call(get)
        return _record(name, value) if value is not None else None

    async def put(self, name: str, record: AdapterRecord) -> None:
        async def put(c: Etcd3Client) -> None:
            assert c.kv is not None
            value = json.dumps(asdict(record)).encode()
            await c.kv.put(self.prefix + name, value, timeout=ETCD_OP_TIMEOUT_S)

        await self.session.call(put)

    async def delete(self, name: str) -> AdapterRecord | None:
        """The record ``name`` had, if any."""

        async def delete(c: Etcd3Client) -> bytes | None:
            assert c.kv is not None
            resp = await c.kv.delete(self.prefix + name, prev_kv=True, timeout=ETCD_OP_TIMEOUT_S)
            return resp.prev_kvs[0].value if resp.prev_kvs else None

        value = await self.session.call(delete)
        return _record(name, value) if value is not None else None

    async def adapters(self, base_model: str) -> dict[str, AdapterRecord]:
        """The recorded adapters of ``base_model``."""

        async def scan(c: Etcd3Client) -> dict[str, AdapterRecord]:
            assert c.kv is not None
            end = prefix_range_end(self.prefix.encode())
            resp = await c.kv.get(self.prefix, range_end=end, timeout=ETCD_OP_TIMEOUT_S)
            out = {}
            for kv in resp.kvs:
                name = kv.key.decode()[len(self.prefix) :]
                record = _record(name, kv.value)
                if record is not None and record.base_model == base_model:
                    out[name] = record
            return out

        return await self.session.call(scan)

    async def close(self) -> None:
        await self.session.close()

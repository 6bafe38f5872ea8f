"""Generate the Helm chart's flag table (deploy/helm/epdserve/files/flags.json) from the configs.

Usage: python scripts/gen_helm_flags.py [--out FILE]

The chart builds each container's argv from this table exactly as ``to_argv`` does in
``services/cli/commands.py``: one entry per dataclass field, in field order, with its flag,
its Helm values key (camelCase), its type and its default; a flag is written only when the
value differs from the default. tests/deploy/test_chart.py regenerates the table and fails
when the committed file is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_FILE = ROOT / "deploy" / "helm" / "epdserve" / "files" / "flags.json"


def camel(name: str) -> str:
    """``request_timeout_s`` -> ``requestTimeoutS`` (the values key of a field)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(args[0])
    if origin is list:
        return "list"
    names = {str: "str", int: "int", float: "float", bool: "bool"}
    if tp not in names:
        raise TypeError(f"no Helm rendering for field type {tp!r}")
    return names[tp]


def field_table(cls: type) -> list[dict[str, Any]]:
    """One entry per init field of ``cls``, in the order ``to_argv`` writes them."""
    hints = typing.get_type_hints(cls)
    table = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        table.append(
            {
                "field": f.name,
                "key": camel(f.name),
                "flag": "--" + f.name.replace("_", "-"),
                "type": _type_name(hints[f.name]),
                "default": default,
            }
        )
    return table


def build() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from services.common.grpc_utils import ROLES
    from services.engine.config import EngineConfig
    from services.kvstore.config import KVStoreConfig
    from services.router.config import RouterConfig
    from services.worker.config import WorkerConfig

    return {
        "_generated_by": "scripts/gen_helm_flags.py from services/*/config.py: do not edit",
        "roles": list(ROLES),
        "router": field_table(RouterConfig),
        "worker": field_table(WorkerConfig),
        "engine": field_table(EngineConfig),
        "kvstore": field_table(KVStoreConfig),
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_FILE)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

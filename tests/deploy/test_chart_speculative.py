"""The Helm value workers.engine.speculativeConfig reaches every worker Deployment: the
rendered command carries --speculative-config, and the worker's own parser turns it back
into the same speculation settings (issue 20: "--speculative-config ... in Helm values")."""

from __future__ import annotations

import json

from tests.deps import HELM, KUBERNETES_VALIDATE, require

require("helm_python", HELM)
require("kubernetes_validate", KUBERNETES_VALIDATE)

import chart_helpers as ch  # noqa: E402

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 3})


def test_speculative_config_value_reaches_the_workers() -> None:
    from services.common.dataclass_cli import from_args
    from services.engine.config import EngineConfig
    from services.worker.main import build_parser

    values = ch.merge_overlays(
        ch.profile("pd"), {"workers": {"engine": {"speculativeConfig": SPEC}}}
    )
    workers = [o for o in ch.render_objects(values)
               if o["kind"] == "Deployment" and "-worker-" in o["metadata"]["name"]]  # fmt: skip
    assert len(workers) >= 2  # prefill and decode
    for dep in workers:
        container = dep["spec"]["template"]["spec"]["containers"][0]
        argv = container["command"] + container.get("args", [])
        assert argv[argv.index("--speculative-config") + 1] == SPEC
        engine = from_args(EngineConfig, build_parser().parse_args(argv[3:]))
        spec = engine.speculative
        assert spec is not None and (spec.method, spec.num_speculative_tokens) == ("ngram", 6)
        assert spec.prompt_lookup_min == 3
    default = [o for o in ch.render_objects() if o["kind"] == "Deployment"]
    assert all("--speculative-config" not in str(o) for o in default)

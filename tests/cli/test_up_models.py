"""`epdserve up --model A --model B`: one model group per --model, each with the role counts
(no process is started)."""

from __future__ import annotations

import argparse

import pytest

from services.cli.cluster_spec import ClusterSpec, ModelGroup
from services.cli.launcher import LocalCluster
from services.cli.up import add_arguments, model_groups


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_each_model_gets_the_role_counts() -> None:
    args = parse("--model", "/m/a", "--model", "/m/b", "--served-model-name", "a",
                 "--served-model-name", "b", "--prefill", "1", "--decode", "2")  # fmt: skip
    groups = model_groups(args, mixed=0)
    assert groups == [ModelGroup("/m/a", "a", 0, 1, 2), ModelGroup("/m/b", "b", 0, 1, 2)]
    first, *more = groups
    spec = ClusterSpec(model=first.model, served_model_name="a", mixed=0, prefill=1, decode=2,
                       more_models=more)  # fmt: skip
    cluster = LocalCluster(spec)
    try:
        plan = cluster.worker_plan()
        assert plan == [(0, "prefill"), (0, "decode"), (0, "decode"),
                        (1, "prefill"), (1, "decode"), (1, "decode")]  # fmt: skip
        argv = cluster.worker_argv(3, "prefill", group=1)
        assert argv[argv.index("--model") + 1] == "/m/b"
        assert argv[argv.index("--served-model-name") + 1] == "b"
    finally:
        cluster.stop()
    # One model: the default, as before.
    assert model_groups(parse(), mixed=1) == [ModelGroup(None, None, 1)]


def test_bad_model_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="one per model"):
        model_groups(parse("--model", "/m/a", "--model", "/m/b", "--served-model-name", "a"), 1)
    with pytest.raises(ValueError, match="share a served name"):
        ClusterSpec(model="/x/m", more_models=[ModelGroup("/y/m")])


def test_lora_flags_reach_their_models_workers(tmp_path) -> None:
    """`epdserve up --lora-modules MODEL:NAME=PATH --max-loras N --max-lora-rank R`: each
    adapter reaches the workers of its own model only; the slot flags reach every worker.
    Before, every adapter went to every model's workers (trained for that model or not)."""
    from services.cli.up import engine_overrides

    args = parse("--model", "/m/a", "--model", "/m/b", "--lora-modules", f"a:sql={tmp_path}",
                 f"b:chat={tmp_path}", "--max-loras", "3", "--max-lora-rank", "32")  # fmt: skip
    overrides = engine_overrides(args)
    first, *more = model_groups(args, mixed=1)
    cluster = LocalCluster(ClusterSpec(model=first.model, more_models=more, mixed=1,
                                       lora_modules=first.lora_modules,
                                       engine_overrides=overrides))  # fmt: skip
    try:
        for group, adapter in ((0, "sql"), (1, "chat")):
            argv = cluster.worker_argv(group, "mixed", group=group)
            got = {flag: argv[argv.index(flag) + 1]
                   for flag in ("--lora-modules", "--max-loras", "--max-lora-rank")}  # fmt: skip
            assert got == {"--lora-modules": f"{adapter}={tmp_path}", "--max-loras": "3",
                           "--max-lora-rank": "32"}  # fmt: skip
            assert argv.count("--lora-modules") == 1
            assert argv[argv.index("--lora-modules") + 2].startswith("--")  # one adapter
    finally:
        cluster.stop()


def test_a_models_file_gives_each_model_its_own_workers(tmp_path) -> None:
    """`epdserve up --models-file F`: each group its own role counts (the issue's "or a
    models file"; none before); a bad file is a clear error before anything starts."""
    import json

    f = tmp_path / "models.json"
    f.write_text(json.dumps([{"model": "/m/a", "served_model_name": "a", "mixed": 2},
                             {"model": "/m/b", "prefill": 1, "decode": 1, "mixed": 0}]))  # fmt: skip
    groups = model_groups(parse("--models-file", str(f)), mixed=1)
    assert groups == [ModelGroup("/m/a", "a", 2), ModelGroup("/m/b", None, 0, 1, 1)]
    first, *more = groups
    cluster = LocalCluster(ClusterSpec(model=first.model, served_model_name="a", mixed=2,
                                       more_models=more))  # fmt: skip
    try:
        assert cluster.worker_plan() == [(0, "mixed"), (0, "mixed"), (1, "prefill"), (1, "decode")]
    finally:
        cluster.stop()
    bad = {
        "[]": "non-empty JSON list",
        '[{"served_model_name": "x"}]': 'entry 0 must be an object with "model"',
        '[{"model": "/m/a", "gpus": 2}]': "only",
        '[{"model": "/m/a", "mixed": "2"}]': "worker counts are integers",
        '[{"model": "/m/a", "mixed": 0, "prefill": 1}]': "entry 0: PD mode needs both",
        "{not json": "--models-file",
    }
    for text, message in bad.items():
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            model_groups(parse("--models-file", str(f)), mixed=1)
    with pytest.raises(ValueError, match="not both"):
        model_groups(parse("--models-file", str(f), "--model", "/m/a"), mixed=1)
    with pytest.raises(ValueError, match="No such file"):
        model_groups(parse("--models-file", str(tmp_path / "missing.json")), mixed=1)


def test_extreme_models_files_and_counts_are_clear_errors(tmp_path) -> None:
    """chaos6's attack on --models-file and the counts: each was a traceback, or was
    accepted (a count of 10^9 had `up` build a list of 10^9 roles after starting etcd)."""
    import json

    f = tmp_path / "models.json"
    bad = {
        "[" * 100_000 + "]" * 100_000: "recursion",  # was a RecursionError traceback
        json.dumps([{"model": 5}]): "model must be a non-empty printable string",  # TypeError
        json.dumps([{"model": "/m/a", "served_model_name": ""}]): "served_model_name",
        json.dumps([{"model": "/m/a", "served_model_name": "a\u0000b"}]): "printable",
        json.dumps([{"model": "/m/a", "mixed": True}]): "worker counts are integers",
        json.dumps([{"model": "/m/a", "mixed": 10**9}]): "at most 256 workers",
    }
    for text, message in bad.items():
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            model_groups(parse("--models-file", str(f)), mixed=1)
    with pytest.raises(ValueError, match="at most 256 workers"):
        model_groups(parse("--prefill", str(10**9), "--decode", "1"), mixed=0)
    with pytest.raises(ValueError, match="routers"):
        ClusterSpec(routers=10**9)


def test_a_missing_or_null_model_is_refused_before_anything_starts(tmp_path, monkeypatch,
                                                                    capsys) -> None:  # fmt: skip
    """A model that is not there was found by the router after etcd and the workers had
    started; a models file's ``"model": null`` silently served the embedded default."""
    import json

    from services.cli import up

    class NoStart:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("a process would start")

    monkeypatch.setattr(up, "LocalCluster", NoStart)
    monkeypatch.setenv("EPDSERVE_CONFIG_DIR", str(tmp_path / "config"))
    (tmp_path / "empty").mkdir()
    f = tmp_path / "models.json"
    cases = {
        ("--model", str(tmp_path / "nope")): "is neither a folder with config.json nor a .gguf",
        ("--model", str(tmp_path / "empty")): "has no config.json",
        ("--models-file", str(f)): '"model" is null; give an HF folder, a .gguf file or "embedded"',
    }
    f.write_text(json.dumps([{"model": "embedded", "mixed": 1}, {"model": None, "mixed": 1}]))
    for argv, message in cases.items():
        assert up.run(parse(*argv, "--port", "0")) == 2
        assert message in capsys.readouterr().err
    f.write_text(json.dumps([{"model": "embedded", "served_model_name": "a"},
                             {"model": str(tmp_path / "nope"), "mixed": 2}]))  # fmt: skip
    assert up.run(parse("--models-file", str(f), "--port", "0")) == 2
    assert "nope' is neither" in capsys.readouterr().err
    # "embedded" is the default model, as in the Helm chart's model.path
    f.write_text(json.dumps([{"model": "embedded", "served_model_name": "a"}]))
    assert model_groups(parse("--models-file", str(f)), mixed=1) == [ModelGroup(None, "a", 1)]


def test_a_blank_host_or_unusable_frontend_cores_are_refused_before_start() -> None:
    """`up --host ""` started etcd and a router listening on every interface, and failed
    when the worker could not bind (~30 s in); `--frontend-cores 99-100` failed when the
    router started. Both are now refused by ClusterSpec, before anything starts."""
    import os

    from services.router.config import RouterConfig

    for host in ("", "  "):
        with pytest.raises(ValueError, match="--host must name an address"):
            ClusterSpec(host=host)
        with pytest.raises(ValueError, match="host must name an address"):
            RouterConfig(etcd="127.0.0.1:1", host=host)
    beyond = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ValueError, match="--frontend-cores names CPUs this process may not use"):
        ClusterSpec(frontend_cores=f"{beyond}")
    ClusterSpec(frontend_cores=str(min(os.sched_getaffinity(0))))  # a CPU it may use: fine

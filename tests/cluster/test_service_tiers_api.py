"""Service tiers through the official OpenAI and Anthropic SDKs on a real cluster (etcd, a
worker, a router with API keys): the tier asked for (or the key's default) is the one the
response says served it, every tier gives the same greedy text, bad values are 400s in each
API's format, and a key's highest tier is enforced (403)."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest
from cluster_helpers import TINY_NAME, cli, start_cluster, status

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

CHAT = [{"role": "user", "content": "Name three colours."}]
KEYS = "k-open\nk-offline max_tier=flex\nk-premium default_tier=priority\nk-low min_priority=0\n"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(KEYS)
    c = start_cluster(tiny_model_dir("llama"), router_overrides={"api_keys_file": str(keys)})
    yield c
    c.stop()


def oai(cluster, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key=key, timeout=60, max_retries=0)


def claude(cluster, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=cluster.base_url, api_key=key, timeout=60, max_retries=0)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(
        model=TINY_NAME, messages=CHAT, max_tokens=8, temperature=0, **kw
    )


def test_openai_service_tier_and_priority(cluster) -> None:
    c = oai(cluster, "k-open")
    ref = chat(c)
    assert ref.service_tier == "default"
    for asked, served in (("auto", "default"), ("default", "default"), ("flex", "flex"),
                          ("priority", "priority")):  # fmt: skip
        got = chat(c, service_tier=asked, extra_body={"priority": -3})
        assert got.service_tier == served
        assert got.choices[0].message.content == ref.choices[0].message.content
    chunks = list(chat(c, service_tier="flex", stream=True))
    assert {ch.service_tier for ch in chunks} == {"flex"}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
        ref.choices[0].message.content
    )
    done = c.completions.create(model=TINY_NAME, prompt="Hello", max_tokens=4,
                                extra_body={"service_tier": "flex", "priority": 2})  # fmt: skip
    assert done.model_extra["service_tier"] == "flex"
    assert chat(oai(cluster, "k-premium")).service_tier == "priority"  # the key's default


@pytest.mark.parametrize(
    "body",
    [{"service_tier": "gold"}, {"service_tier": 1}, {"priority": "high"}, {"priority": 2**40},
     {"priority": 1.5}],
)  # fmt: skip
def test_openai_bad_tier_values_are_400s(cluster, body) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(oai(cluster, "k-open"), extra_body=body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == next(iter(body))


def test_offline_only_key_cannot_ask_for_online_tiers(cluster) -> None:
    c = oai(cluster, "k-offline")
    assert chat(c).service_tier == "flex"  # auto: the key's default
    for asked in ("priority", "default"):
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(c, service_tier=asked)
        assert "up to 'flex'" in e.value.message and e.value.body["param"] == "service_tier"


def test_anthropic_service_tier_and_usage(cluster) -> None:
    def ask(key: str, extra: dict | None = None, **kw):
        return claude(cluster, key).messages.create(
            model=TINY_NAME, max_tokens=8, messages=CHAT,
            extra_body={"temperature": 0, **(extra or {})}, **kw,
        )  # fmt: skip

    ref = ask("k-open")
    assert ref.usage.service_tier == "standard"
    assert ask("k-open", service_tier="standard_only").usage.service_tier == "standard"
    premium = ask("k-premium", service_tier="auto")
    assert premium.usage.service_tier == "priority"
    assert ask("k-premium", service_tier="standard_only").usage.service_tier == "standard"
    offline = ask("k-offline", service_tier="standard_only")  # capped at the key's flex
    assert offline.usage.service_tier == "batch"
    assert offline.content[0].text == premium.content[0].text == ref.content[0].text
    with claude(cluster, "k-premium").messages.stream(
        model=TINY_NAME, max_tokens=4, messages=CHAT
    ) as stream:
        assert stream.get_final_message().usage.service_tier == "priority"
    with pytest.raises(anthropic.BadRequestError) as e:
        ask("k-open", {"service_tier": "gold"})
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "service_tier" in e.value.body["error"]["message"]


def test_key_bounds_the_integer_priority_and_anthropic_asks_for_priority(cluster) -> None:
    low = oai(cluster, "k-low")
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(low, extra_body={"priority": -1})
    assert e.value.body["param"] == "priority" and "priority 0 or higher" in e.value.message
    assert chat(low, extra_body={"priority": 0}).service_tier == "default"

    def ask(key: str, tier: str):
        return claude(cluster, key).messages.create(
            model=TINY_NAME, max_tokens=4, messages=CHAT,
            extra_body={"temperature": 0, "service_tier": tier},
        )  # fmt: skip

    assert ask("k-open", "priority").usage.service_tier == "priority"
    with pytest.raises(anthropic.PermissionDeniedError) as e2:
        ask("k-offline", "priority")
    assert e2.value.body["error"]["type"] == "permission_error"


def test_status_and_metrics_show_both_classes(cluster) -> None:
    """After the tests above (flex and online requests): ``epdserve status`` shows the online
    and offline classes and the engine's fitted step cost, and the router counts requests and
    tokens per tier."""
    chat(oai(cluster, "k-open"), service_tier="flex")
    out = cli(cluster, "status")
    assert out.returncode == 0, out.stderr
    assert "offline (flex): 0 waiting, 0 running" in out.stdout and "SLOs met" in out.stdout
    assert "ONLINE_TTFT" in out.stdout and "OFFLINE_W/R" in out.stdout and "STEP_MS" in out.stdout
    # Per worker: its online means, its offline work. Those come from the worker's load
    # reports, so the last one may still count the flex request that just ended: wait for one
    # sent after it (a report interval, bounded).
    deadline = time.monotonic() + 10
    while True:
        (worker,) = status(cluster)["workers"]
        if worker["offline_running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert worker["online_ttft_ms"] > 0 and worker["online_tpot_ms"] > 0
    # The step cost the share and the pace count in, fitted on the steps it ran (a tiny
    # model's slope may be any sign: its steps are mostly fixed cost).
    assert worker["step_fixed_ms"] != 0 and isinstance(worker["step_token_ms"], float)
    assert (worker["offline_waiting"], worker["offline_running"]) == (0, 0)
    text = httpx.get(cluster.base_url + "/metrics", timeout=5).text
    counts = {
        line.split('service_tier="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("epdserve:router_tier_requests_total{")
    }
    assert counts["flex"] >= 1 and counts["default"] >= 1 and counts["priority"] >= 1
    assert "epdserve:router_offline_queue_seconds_count 0" not in text

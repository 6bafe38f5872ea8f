"""Pooling models on a real cluster (etcd, worker, router): /v1/embeddings through the
official OpenAI SDK, /v1/rerank, /v2/rerank and /v1/score, each equal to a transformers
reference on a tiny random model; bad inputs are 400s in OpenAI's format."""

from __future__ import annotations

import base64
import signal
import struct
import time

import grpc
import httpx
import pytest
import torch
import torch.nn.functional as F
from cluster_helpers import TINY_NAME, openai_client, start_cluster, workers

from services.common.grpc_utils import role_to_pb
from services.common.proto import worker_pb2 as pb
from services.common.proto import worker_pb2_grpc as pb_grpc
from services.router.api.pooling import qwen3_reranker_prompt
from tests.conftest import TINY_CONFIG, tokenizer_source

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

TEXTS = ["The capital of France is Paris.", "Gravity pulls things down.", "hi"]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    """A bare Qwen3Model checkpoint (as Qwen3-Embedding ships its weights)."""
    import shutil

    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**TINY_CONFIG, head_dim=32, tie_word_embeddings=True)
    cfg.architectures = ["Qwen3Model"]
    out = tmp_path_factory.mktemp("qwen3-embed")
    transformers.Qwen3Model(cfg).eval().save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source() / name, out / name)
    return out


@pytest.fixture(scope="module")
def embed_cluster(embed_dir):
    # A request finding its worker gone waits 1 s for a restart (none comes here), not 60.
    c = start_cluster(embed_dir, workers=1, engine_overrides={"max_model_len": 64},
                      router_overrides={"worker_restart_wait_s": 1.0})  # fmt: skip
    yield c
    c.stop()


def post(c, path: str, body: dict) -> httpx.Response:
    return httpx.post(c.base_url + path, json=body, timeout=60)


def hf_embeddings(model_dir, texts_or_ids) -> list[torch.Tensor]:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for x in texts_or_ids:
            ids = tok(x)["input_ids"] if isinstance(x, str) else x
            out.append(F.normalize(model(torch.tensor([ids])).last_hidden_state[0, -1], dim=-1))
    return out


def cosine(a, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(torch.tensor(a, dtype=torch.float32), b, dim=0))


def test_openai_sdk_embeddings_equal_transformers(embed_cluster, embed_dir) -> None:
    from transformers import AutoTokenizer

    oai = openai_client(embed_cluster)
    ref = hf_embeddings(embed_dir, TEXTS)
    # The SDK asks for base64 and decodes it; float is asked for explicitly below.
    got = oai.embeddings.create(model=TINY_NAME, input=TEXTS)
    assert [d.index for d in got.data] == [0, 1, 2]
    for d, r in zip(got.data, ref, strict=True):
        assert len(d.embedding) == 64 and cosine(d.embedding, r) >= 1 - 1e-4
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    floats = oai.embeddings.create(model=TINY_NAME, input=TEXTS[0], encoding_format="float")
    assert cosine(floats.data[0].embedding, ref[0]) >= 1 - 1e-4
    ids = [[5, 17, 300], [42]]
    by_ids = oai.embeddings.create(model=TINY_NAME, input=ids, dimensions=16)
    for d, r in zip(by_ids.data, hf_embeddings(embed_dir, ids), strict=True):
        assert (
            len(d.embedding) == 16 and cosine(d.embedding, F.normalize(r[:16], dim=0)) >= 1 - 1e-4
        )
    raw = post(embed_cluster, "/v1/embeddings",
               {"model": TINY_NAME, "input": [7, 8, 9], "encoding_format": "base64"}).json()  # fmt: skip
    vec = struct.unpack("<64f", base64.b64decode(raw["data"][0]["embedding"]))
    assert cosine(list(vec), hf_embeddings(embed_dir, [[7, 8, 9]])[0]) >= 1 - 1e-4
    # truncate_prompt_tokens (vLLM's): the last k tokens of a text or of token ids.
    tail = AutoTokenizer.from_pretrained(str(embed_dir))(TEXTS[0])["input_ids"][-3:]
    for given, kept in ((TEXTS[0], tail), ([5, 17, 300, 42], [17, 300, 42])):
        cut = oai.embeddings.create(model=TINY_NAME, input=given, encoding_format="float",
                                    extra_body={"truncate_prompt_tokens": 3})  # fmt: skip
        assert cosine(cut.data[0].embedding, hf_embeddings(embed_dir, [kept])[0]) >= 1 - 1e-4
        assert cut.usage.prompt_tokens == 3


def test_a_langchain_sized_batch_is_served(embed_cluster) -> None:
    """LangChain's OpenAIEmbeddings sends 1000 texts a request and OpenAI takes 2048; the
    router refused more than 64 (--max-prompts, the completions bound) with a 400. Each
    embedding of the batch equals the text's own."""
    oai = openai_client(embed_cluster, timeout=120)
    texts = [f"document {i}: {TEXTS[i % 3]}" for i in range(1000)]
    got = oai.embeddings.create(model=TINY_NAME, input=texts, encoding_format="float")
    assert [d.index for d in got.data] == list(range(1000))
    for i in (0, 517, 999):
        one = oai.embeddings.create(model=TINY_NAME, input=texts[i], encoding_format="float")
        assert cosine(got.data[i].embedding, torch.tensor(one.data[0].embedding)) >= 1 - 1e-4
    scores = post(embed_cluster, "/v1/rerank",
                  {"model": TINY_NAME, "query": QUERY, "documents": texts}).json()  # fmt: skip
    assert len(scores["results"]) == 1000, scores


def test_rerank_and_score_of_an_embedding_model_are_cosines(embed_cluster, embed_dir) -> None:
    q, *docs = hf_embeddings(embed_dir, [QUERY, *TEXTS])
    ref = [float(q @ d) for d in docs]
    body = post(embed_cluster, "/v1/rerank",
                {"model": TINY_NAME, "query": QUERY, "documents": TEXTS, "top_n": 2}).json()  # fmt: skip
    best = sorted(range(3), key=lambda i: -ref[i])[:2]
    assert [r["index"] for r in body["results"]] == best
    for r in body["results"]:
        assert abs(r["relevance_score"] - ref[r["index"]]) < 1e-4
        assert r["document"]["text"] == TEXTS[r["index"]]
    score = post(embed_cluster, "/v1/score",
                 {"model": TINY_NAME, "text_1": QUERY, "text_2": TEXTS}).json()  # fmt: skip
    assert [abs(d["score"] - r) < 1e-4 for d, r in zip(score["data"], ref, strict=True)] == [
        True
    ] * 3


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/embeddings", {"input": ""}, "must not contain an empty input"),
        ("/v1/embeddings", {"input": []}, "must not be empty"),
        ("/v1/embeddings", {"input": [[]]}, "must not contain an empty input"),
        ("/v1/embeddings", {"input": [1, "a"]}, "must be a string"),
        ("/v1/embeddings", {"input": [49152]}, "is not a token id"),
        ("/v1/embeddings", {"input": [5] * 65}, "context length"),
        ("/v1/embeddings", {"input": "x", "dimensions": 65}, "exceeds"),
        ("/v1/embeddings", {"input": "x", "dimensions": 0}, "'dimensions' must be"),
        # Past the wire's uint32: the protobuf ValueError was a 500 internal_error.
        ("/v1/embeddings", {"input": "x", "dimensions": 2**32}, "'dimensions' must be"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/embeddings", {"input": ["a"] * 2049}, "more than the limit of 2048"),
        ("/v1/rerank", {"query": "q", "documents": ["a"] * 2049}, "more than the limit of 2048"),
        ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 65}, "in [1, 64]"),
        ("/v1/embeddings", {"input": "x", "truncate_prompt_tokens": 0}, "in [1, 64]"),
        ("/v1/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": -2}, ">= -1"),
        ("/v1/rerank", {"query": "q", "documents": []}, "must not be empty"),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "as many as"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}, "pooling model"),
    ],
)  # fmt: skip
def test_bad_inputs_are_openai_400s(embed_cluster, path, body, message) -> None:
    r = post(embed_cluster, path, {"model": TINY_NAME, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error", err


def test_pooling_worker_refuses_prefill_and_decode_roles(embed_cluster) -> None:
    address = workers(embed_cluster)["worker-0"]["address"]
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        for role in ("prefill", "decode"):
            with pytest.raises(grpc.RpcError) as err:
                stub.SetRole(pb.SetRoleRequest(role=role_to_pb(role)), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "serves role 'mixed' only" in err.value.details()
    text = httpx.get(embed_cluster.base_url + "/metrics", timeout=5).text
    assert 'epdserve:router_requests_total{api="embeddings",outcome="success"}' in text


def test_embeddings_while_the_only_worker_stops_are_never_a_400(embed_cluster) -> None:
    """SIGTERM of the only worker (it drains, leaves and exits; `up` restarts it): embeddings
    requests meanwhile wait or get a 503, never the 400 "it is a generative model" they got
    once the router listed no worker of the pooling model (through `epdserve up --engine-arg
    pooling=embed`: 61 such 400s in one drain). The module's last test on this cluster."""
    worker = embed_cluster.workers[0]
    worker.signal(signal.SIGTERM)
    codes: list[tuple[int, str | None]] = []
    deadline, after_exit = time.monotonic() + 90, 0
    while time.monotonic() < deadline and after_exit < 2:
        r = post(embed_cluster, "/v1/embeddings", {"model": TINY_NAME, "input": "hi"})
        codes.append((r.status_code, r.json().get("error", {}).get("code")))
        after_exit += not worker.alive()
    assert not worker.alive() and codes[-1][0] == 503, codes
    assert {code for code, _ in codes} <= {200, 503}, codes


def test_qwen3_reranker_rerank_and_score_equal_transformers(tiny_model_dir) -> None:
    """A causal LM served as a yes/no reranker: P(yes) on the Qwen3-Reranker prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir("qwen3")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    no, yes = tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")
    ref = []
    with torch.no_grad():
        for doc in TEXTS:
            ids = tok(qwen3_reranker_prompt(QUERY, doc))["input_ids"]
            logits = hf(torch.tensor([ids])).logits[0, -1]
            ref.append(float(logits[[no, yes]].softmax(-1)[1]))
    c = start_cluster(model_dir, workers=1,
                      engine_overrides={"classifier_from_tokens": "no,yes"})  # fmt: skip
    try:
        for path in ("/v1/rerank", "/v2/rerank"):
            body = post(c, path, {"model": TINY_NAME, "query": QUERY, "documents": TEXTS,
                                  "return_documents": False}).json()  # fmt: skip
            assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -ref[i])
            for r in body["results"]:
                assert abs(r["relevance_score"] - ref[r["index"]]) < 1e-5 and "document" not in r
        score = post(c, "/v1/score", {"model": TINY_NAME, "text_1": [QUERY] * 3,
                                       "text_2": TEXTS}).json()  # fmt: skip
        assert [round(d["score"], 5) for d in score["data"]] == [round(r, 5) for r in ref]
        r = post(c, "/v1/embeddings", {"model": TINY_NAME, "input": "x"})
        assert r.status_code == 400 and "does not support the embeddings API" in r.text
    finally:
        c.stop()


def test_cross_encoder_rerank_and_score_equal_transformers(tmp_path) -> None:
    """A Qwen3ForSequenceClassification cross-encoder: the sigmoid of its one-label head on
    the tokenizer's encoding of each (query, document) pair."""
    import shutil

    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**TINY_CONFIG, head_dim=32, num_labels=1)
    cfg.architectures = ["Qwen3ForSequenceClassification"]
    hf = transformers.Qwen3ForSequenceClassification(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_source() / name, tmp_path / name)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    with torch.no_grad():
        ref = [
            float(hf(torch.tensor([tok(QUERY, text_pair=d)["input_ids"]])).logits[0, 0].sigmoid())
            for d in TEXTS
        ]
    assert max(ref) - min(ref) > 1e-3  # distinct scores: the order below means something
    c = start_cluster(tmp_path, workers=1, engine_overrides={"max_model_len": 64})
    try:
        body = post(c, "/v1/rerank", {"model": TINY_NAME, "query": QUERY, "documents": TEXTS,
                                      "top_n": 2}).json()  # fmt: skip
        assert [r["index"] for r in body["results"]] == sorted(range(3), key=lambda i: -ref[i])[:2]
        for r in body["results"]:
            assert abs(r["relevance_score"] - ref[r["index"]]) < 1e-5
            assert r["document"]["text"] == TEXTS[r["index"]]
        pairs = [tok(QUERY, text_pair=d)["input_ids"] for d in TEXTS]
        assert body["usage"]["total_tokens"] == sum(len(p) for p in pairs)
        score = post(c, "/v1/score", {"model": TINY_NAME, "text_1": QUERY,
                                       "text_2": TEXTS}).json()  # fmt: skip
        assert [round(d["score"], 5) for d in score["data"]] == [round(r, 5) for r in ref]
        # truncate_prompt_tokens: 6 tokens of each pair, the longer text cut first, from
        # the left (vLLM's left-truncating tokenizer).
        tok.truncation_side = "left"
        cut = [tok(QUERY, text_pair=d, truncation=True, max_length=6)["input_ids"] for d in TEXTS]
        assert [len(ids) for ids in cut] == [6, 6, 6]
        with torch.no_grad():
            short = [float(hf(torch.tensor([ids])).logits[0, 0].sigmoid()) for ids in cut]
        score = post(c, "/v1/score", {"model": TINY_NAME, "text_1": QUERY, "text_2": TEXTS,
                                       "truncate_prompt_tokens": 6}).json()  # fmt: skip
        assert [round(d["score"], 5) for d in score["data"]] == [round(r, 5) for r in short]
        assert score["usage"]["prompt_tokens"] == 18
        r = post(c, "/v1/embeddings", {"model": TINY_NAME, "input": "x"})
        assert r.status_code == 400 and "does not support the embeddings API" in r.text
    finally:
        c.stop()

"""Qwen2-VL in the engine equals transformers on a tiny random model (float32): the vision
tower + merger, M-RoPE positions and rotary tables, placeholder expansion, greedy tokens of
text+image prompts (one and two images, chunked prefill) and of text-only prompts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from services.engine.image_processing import expand_image_placeholders
from services.engine.layers.attention import TorchAttention
from services.engine.layers.mrope import MRotaryEmbedding, decode_positions, mrope_positions
from services.engine.multimodal import ImageInputs, merge_embeddings
from tests.conftest import randomize_qkv_biases, tiny_vl_text_config
from tests.engine.test_correctness import GPU_MARKS, on

# Special ids inside the default tokenizer's vocabulary, so outputs detokenize.
IMAGE = 49000
VISION_START = 49001
VISION_END = 49002
MERGE = 2


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def hf_model(request):
    import transformers

    torch.manual_seed(0)
    if request.param == "qwen2_5_vl":
        config_cls = transformers.Qwen2_5_VLConfig
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
        # Windows of 2x2 merged groups, so the tower mixes windowed and full attention.
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            window_size=56,
            fullatt_block_indexes=[1],
        )
    else:
        config_cls = transformers.Qwen2VLConfig
        model_cls = transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
    cfg = config_cls(
        text_config=tiny_vl_text_config(49152),
        vision_config=dict(
            **vision,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=MERGE,
        ),
        image_token_id=IMAGE,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    model = model_cls(cfg).float().eval()
    randomize_qkv_biases(model)
    return model


def engine_class(hf_model):
    from services.engine.models.registry import resolve_model_class

    return resolve_model_class(SimpleNamespace(architectures=[type(hf_model).__name__]))


def random_images(grids: list[tuple[int, int, int]], seed: int = 0) -> ImageInputs:
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(n, 3 * 2 * 14 * 14, generator=g)
    return ImageInputs(pixels, torch.tensor(grids, dtype=torch.long))


def prompt_with_images(images: ImageInputs, text_lens: list[int]) -> list[int]:
    """text, <vision_start> pads <vision_end>, text, ... (already expanded)."""
    ids: list[int] = []
    for i, n in enumerate(images.tokens_per_image(MERGE)):
        ids += list(range(100 + 10 * i, 100 + 10 * i + text_lens[i]))
        ids += [VISION_START] + [IMAGE] * n + [VISION_END]
    ids += list(range(500, 500 + text_lens[-1]))
    return ids


GRIDS = [[(1, 4, 6)], [(1, 4, 4), (1, 6, 2)], [(2, 2, 4)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_vision_tower_matches_transformers(hf_model, grids):
    images = random_images(grids)
    visual = hf_model.model.visual
    tower = engine_class(hf_model)(hf_model.config, TorchAttention()).visual
    tower.load_weights(visual.state_dict().items())
    with torch.no_grad():
        ref = visual(images.pixel_values, grid_thw=images.image_grid_thw).pooler_output
    got = tower(images.pixel_values, images.image_grid_thw)
    assert got.shape == (sum(images.tokens_per_image(MERGE)), 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grids", GRIDS)
def test_mrope_positions_match_get_rope_index(hf_model, grids):
    images = random_images(grids)
    ids = prompt_with_images(images, [3, 5, 4][: len(grids) + 1])
    input_ids = torch.tensor([ids])
    mm_types = (input_ids == IMAGE).int()
    ref_pos, ref_delta = hf_model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_types, image_grid_thw=images.image_grid_thw
    )
    pos, delta = mrope_positions(ids, IMAGE, images.image_grid_thw.tolist(), MERGE)
    assert torch.equal(pos, ref_pos[:, 0])
    assert delta == int(ref_delta)
    # Decode: the token at index len(ids) sits at len(ids) + delta on every axis.
    assert decode_positions(len(ids) + 1, delta).flatten().tolist() == [len(ids) + delta] * 3


def test_mrope_text_only_is_plain_positions():
    pos, delta = mrope_positions([5, 6, 7, 8], IMAGE, [], MERGE)
    assert delta == 0
    assert torch.equal(pos, torch.arange(4).expand(3, 4))


def test_mrope_adjacent_images_stay_separate():
    pos, _ = mrope_positions([1] + [IMAGE] * 8, IMAGE, [(1, 4, 4), (1, 4, 4)], MERGE)
    # The second image starts after the first's max(h, w) / merge = 2 positions.
    assert pos[:, 5].tolist() == [3, 3, 3]
    with pytest.raises(ValueError):
        mrope_positions([IMAGE] * 3, IMAGE, [(1, 4, 4)], MERGE)


def test_mrope_rotary_matches_transformers(hf_model):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    images = random_images([(1, 4, 6)])
    ids = prompt_with_images(images, [3, 4])
    pos, _ = mrope_positions(ids, IMAGE, images.image_grid_thw.tolist(), MERGE)
    text_cfg = hf_model.config.text_config
    rotary = MRotaryEmbedding(16, 512, text_cfg)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(ids), 4, 16, generator=g)
    k = torch.randn(len(ids), 2, 16, generator=g)
    got_q, got_k = rotary(pos, q, k)
    cos, sin = hf_model.model.language_model.rotary_emb(q, pos[:, None, :])
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(got_q, ref_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, ref_k[0].transpose(0, 1))
    # 1-D positions (text-only batches) give plain RoPE.
    flat = torch.arange(len(ids))
    a, _ = rotary(flat, q, k)
    b, _ = rotary(flat.expand(3, -1), q, k)
    torch.testing.assert_close(a, b)


def test_expand_placeholders_and_chunked_merge():
    images = random_images([(1, 4, 4), (1, 2, 4)])
    counts = images.tokens_per_image(MERGE)
    assert counts == [4, 2]
    raw = [1, VISION_START, IMAGE, VISION_END, 2, VISION_START, IMAGE, VISION_END, 3]
    ids = expand_image_placeholders(raw, IMAGE, counts)
    assert ids == [1, VISION_START] + [IMAGE] * 4 + [VISION_END, 2, VISION_START] + [IMAGE] * 2 + [
        VISION_END,
        3,
    ]
    assert expand_image_placeholders(ids, IMAGE, counts) == ids
    with pytest.raises(ValueError):
        expand_image_placeholders(raw, IMAGE, [4])
    embeds = torch.arange(6, dtype=torch.float32)[:, None].expand(6, 8)
    words = torch.full((len(ids), 8), -1.0)
    full = merge_embeddings(words, torch.tensor(ids), IMAGE, embeds, 0, ids)
    # Any chunking gives the same rows as the whole prompt at once.
    for cut in range(1, len(ids)):
        a = merge_embeddings(words[:cut], torch.tensor(ids[:cut]), IMAGE, embeds, 0, ids)
        b = merge_embeddings(words[cut:], torch.tensor(ids[cut:]), IMAGE, embeds, cut, ids)
        torch.testing.assert_close(torch.cat([a, b]), full)
    assert full[[2, 3, 4, 5, 9, 10], 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_image_hashes_differ_by_content():
    a = random_images([(1, 4, 4), (1, 4, 4)], seed=0)
    b = random_images([(1, 4, 4), (1, 4, 4)], seed=1)
    ha, hb = a.hashes(), b.hashes()
    assert len(set(ha + hb)) == 4
    assert a.hashes() == ha


# ---- whole model: greedy tokens ------------------------------------------------------------

MAX_TOKENS = 8


def hf_greedy(model, ids: list[int], images: ImageInputs | None) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            input_ids = torch.tensor([ids])
            kwargs = {}
            if images is not None:
                kwargs = dict(
                    pixel_values=images.pixel_values,
                    image_grid_thw=images.image_grid_thw,
                    mm_token_type_ids=(input_ids == IMAGE).int(),
                )
            logits = model(input_ids, use_cache=False, **kwargs).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
    return out


def engine_greedy(model, ids: list[int], images: ImageInputs | None, chunk: int) -> list[int]:
    """Prefill in chunks of ``chunk`` tokens, then decode, through the paged KV cache."""
    from services.engine.layers.attention import AttentionMetadata, PrefillSegment

    bs = 4
    num_blocks = (len(ids) + MAX_TOKENS + bs - 1) // bs
    for layer in model.attention_layers:
        layer.k_cache = torch.zeros(num_blocks, bs, layer.num_kv_heads, layer.head_dim)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    table = torch.arange(num_blocks)
    grids = images.image_grid_thw.tolist() if images is not None else []
    pos3, delta = mrope_positions(ids, IMAGE, grids, model.spatial_merge_size)
    embeds = (
        model.encode_images(images.pixel_values, images.image_grid_thw)
        if images is not None
        else None
    )
    ids = list(ids)
    out = []
    with torch.no_grad():
        start = 0
        while start < len(ids):
            end = min(start + chunk, len(ids))
            tok = torch.tensor(ids[start:end])
            x = model.model.embed_tokens(tok)
            if embeds is not None:
                x = merge_embeddings(x, tok, IMAGE, embeds, start, ids)
            meta = AttentionMetadata(
                slot_mapping=torch.arange(start, end),
                prefills=[PrefillSegment(0, end - start, end, table[: (end + bs - 1) // bs])],
            )
            hidden = model(tok, pos3[:, start:end], meta, inputs_embeds=x)
            start = end
        for _ in range(MAX_TOKENS):
            nxt = int(model.compute_logits(hidden[-1:]).argmax())
            out.append(nxt)
            ids.append(nxt)
            p = len(ids) - 1
            meta = AttentionMetadata(
                slot_mapping=torch.tensor([p]),
                num_decodes=1,
                decode_block_tables=table[None],
                decode_context_lens=torch.tensor([p + 1]),
                decode_mask=(torch.arange(num_blocks * bs) < p + 1)[None, None, None, :],
            )
            hidden = model(torch.tensor([nxt]), decode_positions(len(ids), delta), meta)
    return out


@pytest.fixture(scope="module")
def engine_model(hf_model):
    model = engine_class(hf_model)(hf_model.config, TorchAttention()).eval()
    # transformers v5 in-memory names (model.language_model.*, model.visual.*).
    model.load_weights(hf_model.state_dict().items())
    return model


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("chunk", [1000, 5])
def test_greedy_with_images_matches_transformers(hf_model, engine_model, grids, chunk):
    images = random_images(grids, seed=len(grids))
    ids = prompt_with_images(images, [3, 5, 4][: len(grids) + 1])
    assert engine_greedy(engine_model, ids, images, chunk) == hf_greedy(hf_model, ids, images)


def test_greedy_text_only_matches_transformers(hf_model, engine_model):
    ids = list(range(300, 317))
    assert engine_greedy(engine_model, ids, None, 1000) == hf_greedy(hf_model, ids, None)


@pytest.fixture(scope="module")
def model_dir(hf_model, tmp_path_factory):
    """The tiny model saved as a Hugging Face folder (original checkpoint names)."""
    import shutil
    from pathlib import Path

    from tests.conftest import tokenizer_source

    out = tmp_path_factory.mktemp("tiny-qwen2-vl")
    hf_model.save_pretrained(str(out))
    src = Path(tokenizer_source())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def greedy():
    from services.engine import SamplingParams

    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_llm_generate_text_only_on_qwen2_vl_checkpoint(hf_model, model_dir):
    from services.engine import LLM

    prompts = [list(range(300, 317)), list(range(1000, 1005))]
    llm = LLM(str(model_dir), dtype="float32", kv_cache_bytes=1 << 22)
    assert llm.engine.max_model_len == 512  # from text_config
    outs = llm.generate(prompts, greedy())
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, None)


def unexpanded(images: ImageInputs, text_lens: list[int]) -> list[int]:
    """The prompt as a chat template writes it: one pad token per image."""
    return unexpanded_ids(prompt_with_images(images, text_lens))


@pytest.mark.parametrize(
    "prefix_caching,device",
    [
        (True, "cpu"),
        (False, "cpu"),
        pytest.param(True, "cuda", marks=GPU_MARKS),
        pytest.param(True, "cuda-eager", marks=GPU_MARKS),
    ],
)
def test_llm_generate_with_images(hf_model, model_dir, prefix_caching, device):
    """Dict prompts with precomputed pixel values, one and two images, mixed with text in one
    batch, chunked prefill (4-token budget); then the same tokens with other images must
    not reuse the first images' cached blocks. On CUDA also with the decode graphs (M-RoPE
    positions)."""
    from services.engine import LLM

    llm = LLM(
        str(model_dir),
        **on(
            device,
            dtype="float32",
            kv_cache_bytes=1 << 22,
            block_size=4,
            max_num_batched_tokens=16,
            enable_prefix_caching=prefix_caching,
        ),
    )
    assert (llm.engine.runner.graphs is not None) == (device == "cuda")
    for seed in (0, 1):
        prompts, refs = [], []
        for grids in GRIDS:
            images = random_images(grids, seed=seed + 10 * len(grids))
            text_lens = [3, 5, 4][: len(grids) + 1]
            prompts.append(
                {
                    "prompt_token_ids": unexpanded(images, text_lens),
                    "multi_modal_data": {
                        "pixel_values": images.pixel_values,
                        "image_grid_thw": images.image_grid_thw,
                    },
                }
            )
            refs.append(hf_greedy(hf_model, prompt_with_images(images, text_lens), images))
        prompts.append(list(range(300, 317)))
        refs.append(hf_greedy(hf_model, list(range(300, 317)), None))
        outs = llm.generate(prompts, greedy())
        assert [o.outputs[0].token_ids for o in outs] == refs


def image_prompt(images: ImageInputs, text_lens: list[int]) -> dict:
    return {
        "prompt_token_ids": unexpanded(images, text_lens),
        "multi_modal_data": {
            "pixel_values": images.pixel_values,
            "image_grid_thw": images.image_grid_thw,
        },
    }


def test_one_token_chunks_on_image_pads_get_the_image(hf_model, model_dir):
    """A step budget of 1 token: every prefill chunk is one token, image pads included. Such
    a chunk is still a prefill (its pad takes the image's embedding), not a decode."""
    from services.engine import LLM

    llm = LLM(str(model_dir), dtype="float32", kv_cache_bytes=1 << 22, max_num_batched_tokens=1)
    images = random_images([(1, 4, 6)], seed=3)
    out = llm.generate(image_prompt(images, [3, 4]), greedy())
    ref = hf_greedy(hf_model, prompt_with_images(images, [3, 4]), images)
    assert out[0].outputs[0].token_ids == ref


def test_leftover_one_token_budget_on_an_image_pad(hf_model, model_dir):
    """A realistic schedule: a text prompt takes all of the step's budget but one token, and
    a prompt whose prefix-cache hit ends inside its image gets that one token, an image pad
    (block size 4: the hit covers tokens 0..7, token 8 is a pad)."""
    from services.engine import LLM

    budget = 8
    llm = LLM(
        str(model_dir),
        dtype="float32",
        kv_cache_bytes=1 << 22,
        block_size=4,
        max_num_batched_tokens=budget,
    )
    images = random_images([(1, 4, 6)], seed=4)
    first = prompt_with_images(images, [3, 4])  # text 0..2, start 3, pads 4..9, end 10
    assert first[8] == IMAGE and first[9] == IMAGE and first[10] == VISION_END
    llm.generate(image_prompt(images, [3, 4]), greedy())  # caches its blocks
    # Same prefix up to token 10, other text after it: the hit stops at block 2 (tokens 8..11).
    second = first[:11] + [700, 701, 702, 703]
    prompt = {**image_prompt(images, [3, 4]), "prompt_token_ids": unexpanded_ids(second)}
    text = list(range(300, 300 + budget - 1))
    outs = llm.generate([text, prompt], greedy())
    assert outs[1].num_cached_tokens == 8
    assert [o.outputs[0].token_ids for o in outs] == [
        hf_greedy(hf_model, text, None),
        hf_greedy(hf_model, second, images),
    ]


def unexpanded_ids(ids: list[int]) -> list[int]:
    """Collapse each run of image pads of an expanded prompt to one pad."""
    return [t for i, t in enumerate(ids) if t != IMAGE or i == 0 or ids[i - 1] != IMAGE]


def test_parse_prompt_forms_and_errors():
    from services.engine.multimodal import parse_prompt

    assert parse_prompt([1, 2]) == ([1, 2], None)
    assert parse_prompt({"prompt": "hi"}) == ("hi", None)
    images = random_images([(1, 4, 4)])
    text, got = parse_prompt(
        {
            "prompt_token_ids": [1, IMAGE],
            "multi_modal_data": {
                "pixel_values": images.pixel_values,
                "image_grid_thw": [1, 4, 4],
            },
        }
    )
    assert text == [1, IMAGE] and got is not None
    assert got.image_grid_thw.tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        parse_prompt({"multi_modal_data": {}})
    with pytest.raises(ValueError, match="image_grid_thw"):
        parse_prompt({"prompt": "x", "multi_modal_data": {"pixel_values": images.pixel_values}})
    with pytest.raises(ValueError, match="unsupported"):
        parse_prompt({"prompt": "x", "multi_modal_data": {"video": []}})


def test_text_model_refuses_images(tiny_model_dir):
    from services.engine import LLM

    images = random_images([(1, 4, 4)])
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", kv_cache_bytes=1 << 22)
    prompt = {
        "prompt_token_ids": [1, 2, 3],
        "multi_modal_data": {
            "pixel_values": images.pixel_values,
            "image_grid_thw": images.image_grid_thw,
        },
    }
    with pytest.raises(ValueError, match="does not take images"):
        llm.generate(prompt, greedy())


def test_recompute_without_images_ends_the_request_not_the_engine(model_dir):
    """A PD decode worker holds a prompt's KV but not its images: when a preemption makes it
    recompute image tokens, that request ends with LOST_IMAGES (the worker reports it as
    unavailable and the router migrates it); the engine keeps serving the others."""
    from services.engine import LLM
    from services.engine.outputs import LOST_IMAGES
    from services.engine.scheduler_output import SchedulerOutput

    llm = LLM(str(model_dir), dtype="float32", kv_cache_bytes=1 << 22, block_size=4,
              enable_prefix_caching=False)  # fmt: skip
    engine = llm.engine
    images = random_images(GRIDS[0])
    prompt = {
        "prompt_token_ids": unexpanded(images, [3, 5]),
        "multi_modal_data": {
            "pixel_values": images.pixel_values, "image_grid_thw": images.image_grid_thw,
        },
    }  # fmt: skip
    engine.add_request("vl", prompt, greedy())
    engine.add_request("text", list(range(300, 317)), greedy())
    while not engine.requests["vl"].seqs[0].num_output_tokens:
        engine.step()
    seq = engine.requests["vl"].seqs[0]
    seq.mm.embeds = None  # as on a decode worker: KV imported, no pixels, no embeddings
    seq.mm.images.pixel_values = None
    engine.scheduler._preempt(seq, SchedulerOutput())
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0]
    assert (finished["vl"].finish_reason, finished["vl"].stop_reason) == ("abort", LOST_IMAGES)
    assert finished["text"].finish_reason == "length"
    engine.block_manager.check_invariants()


def test_a_grid_past_the_context_is_refused_before_expansion(model_dir):
    """A PD Reserve carries each image's grid, no pixels: a grid of 2**32 patches a side made
    a list of that many pad tokens (MemoryError, or the worker's memory gone) before any
    length check. It is a ValueError, and a grid that fits still reserves."""
    import torch

    from services.engine import LLM, SamplingParams

    engine = LLM(str(model_dir), dtype="float32", kv_cache_bytes=1 << 22).engine
    params = SamplingParams(temperature=0, max_tokens=4)
    prompt = [300, IMAGE, 301]

    def images(grid: list[int]) -> ImageInputs:
        return ImageInputs(None, torch.tensor([grid]), content_hashes=["0" * 64])

    with pytest.raises(ValueError, match="the images take"):
        engine.reserve("huge", prompt, params, images=images([2**32 - 1] * 3))
    assert "huge" not in engine.reserved
    engine.reserve("fits", prompt, params, images=images([1, 4, 6]))
    engine.free_reserved("fits")

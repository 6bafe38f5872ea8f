"""A second tiny model for several-model clusters: another family (Qwen2) with a tokenizer of
its own (a 384-token byte-level BPE trained in the test) and its own chat template."""

from __future__ import annotations

from pathlib import Path

OTHER_VOCAB = 384  # at most: the BPE trainer stops sooner on this corpus (350)
# Unlike the default model's ChatML: a prompt rendered with the wrong model's template or
# tokenizer gives other ids, and so other tokens.
OTHER_TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}]: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]:{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Several models and many adapters share one cluster of workers.",
    "[user]: hello there\n[assistant]: hi, how can I help?",
] * 20


def build_other_model(out_dir: Path, seed: int = 3) -> Path:
    """A 2-layer random Qwen2 model with a vocabulary of ``OTHER_VOCAB`` tokens."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=OTHER_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(CORPUS, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = OTHER_TEMPLATE
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir

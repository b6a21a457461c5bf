"""Hugging Face architectures built from small configs with random weights (float64, eval mode so that
dropout is off): every preconditioned module within 1e-8 of the dense per-sample reference, every other
parameter ``g / (1 + λ)``, and only the modules named here fall back. Skipped without ``transformers``
(the ``zoo`` extra)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tests.zoo._check import check  # noqa: E402

# N a power of two: models that cast to float32 inside a float64 forward (LLaMA's RMSNorm) round the
# gradient of the batch mean and of one sample's loss alike only when 1/N is exact. N differs from every
# other dimension (T, DIM, heads, the ViT's 5 positions), so each layer's sample axis is unambiguous.
N, T, VOCAB, DIM = 4, 7, 37, 16
SMALL = dict(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
             max_position_embeddings=32, vocab_size=VOCAB)


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (N, T), generator=g)


def _lm_loss(model, tokens):
    def losses():
        logits = model(input_ids=tokens).logits
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
        return per_token.reshape(N, -1).mean(1)
    return losses


def _classifier_loss(model, inputs, labels):
    return lambda: F.cross_entropy(model(**inputs).logits, labels, reduction="none")


def _fallbacks(seng):
    return {r.module for r in seng.coverage() if not r.curvature}


def _build(cls, config):
    torch.manual_seed(0)
    return cls(config).double().eval()


def test_gpt2_tied_lm_head_conv1d_and_attention_are_exact():
    config = transformers.GPT2Config(n_layer=2, n_embd=DIM, n_head=2, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = _build(transformers.GPT2LMHeadModel, config)
    assert model.lm_head.weight is model.transformer.wte.weight
    seng = check(model, _lm_loss(model, _tokens()), N)
    # positions are looked up once for the whole batch, (1, T): their per-sample gradient is not in the hook
    assert _fallbacks(seng) == {"transformer.wpe"}


def test_llama_rmsnorm_and_gated_mlp_are_exact():
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0)
    model = _build(transformers.LlamaForCausalLM, config)
    seng = check(model, _lm_loss(model, _tokens()), N)
    assert _fallbacks(seng) == set()


def test_llama_at_batch_equal_to_the_context_is_exact():
    """``N == T == 8``: every layer's input is ``(8, 8, ...)``; the structural probe tells the axes apart."""
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0)
    model = _build(transformers.LlamaForCausalLM, config)
    tokens = torch.randint(0, VOCAB, (8, 8), generator=torch.Generator().manual_seed(0))

    def losses():
        logits = model(input_ids=tokens).logits
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
        return per_token.reshape(8, -1).mean(1)
    seng = check(model, losses, 8)
    assert _fallbacks(seng) == set()


def test_bert_classifier_is_exact():
    config = transformers.BertConfig(**SMALL, type_vocab_size=2, num_labels=3, pad_token_id=0)
    model = _build(transformers.BertForSequenceClassification, config)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(1))
    seng = check(model, _classifier_loss(model, {"input_ids": _tokens(), "attention_mask": mask}, labels), N)
    assert _fallbacks(seng) <= {"bert.embeddings.position_embeddings"}


def test_vit_patch_conv_cls_token_and_position_embeddings_are_exact():
    config = transformers.ViTConfig(**{k: v for k, v in SMALL.items() if k not in ("vocab_size",
                                                                                   "max_position_embeddings")},
                                    image_size=8, patch_size=4, num_channels=3, num_labels=3)
    model = _build(transformers.ViTForImageClassification, config)
    pixels = torch.randn(N, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(3))
    seng = check(model, _classifier_loss(model, {"pixel_values": pixels}, labels), N)
    assert _fallbacks(seng) == set()

"""What SENG preconditions on full-size third-party architectures, and what one refresh costs.

For each architecture (random weights, float32, eval mode: no dropout, gradients still flow), one
forward+backward and ``seng.step()`` on a refresh step; prints ``seng.coverage()`` after that refresh (so
fallbacks found at refresh, such as coupled or ambiguous layers, are in it), then the refresh step's time
against a plain forward+backward. The Hugging Face models need the ``zoo`` extra (``transformers``).

    python benchmarks/coverage_zoo.py                    # all architectures, batch 4, sequence 64
    python benchmarks/coverage_zoo.py --only gpt2 vit --batch 4 --full-tables --train
    python benchmarks/coverage_zoo.py --batch 8 --seq 8 --threads 1   # batch = context and = ConvNeXt's 8x8 stage
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_seng import SENG

Case = Tuple[nn.Module, Callable[[nn.Module], torch.Tensor], dict]


def _lm(model: nn.Module, vocab: int, batch: int, seq: int) -> Case:
    tokens = torch.randint(0, vocab, (batch, seq))

    def loss(m):
        logits = m(input_ids=tokens).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    return model, loss, {}


def hf_cases(batch: int, seq: int) -> Dict[str, Callable[[], Case]]:
    try:
        import transformers as tf
    except ImportError:
        return {}

    def gpt2():
        return _lm(tf.GPT2LMHeadModel(tf.GPT2Config()), 50257, batch, seq)

    def llama():
        config = tf.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
        return _lm(tf.LlamaForCausalLM(config), 32000, batch, seq)

    def bert():
        model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2))
        tokens, labels = torch.randint(0, 30522, (batch, seq)), torch.randint(0, 2, (batch,))
        return model, lambda m: F.cross_entropy(m(input_ids=tokens).logits, labels), {}

    def vit():
        model = tf.ViTForImageClassification(tf.ViTConfig(num_labels=10))
        pixels, labels = torch.randn(batch, 3, 224, 224), torch.randint(0, 10, (batch,))
        return model, lambda m: F.cross_entropy(m(pixel_values=pixels).logits, labels), {}

    return {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit}


def torch_cases(batch: int, seq: int) -> Dict[str, Callable[[], Case]]:
    def transformer():
        model = nn.Transformer(d_model=256, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                               dim_feedforward=512)  # batch_first=False: inputs (T, N, E)
        src, tgt = torch.randn(seq, batch, 256), torch.randn(seq // 2, batch, 256)
        mask = nn.Transformer.generate_square_subsequent_mask(seq // 2)
        return model, lambda m: m(src, tgt, tgt_mask=mask).square().mean(), {"batch_axis": 1}

    def lightning_demo():
        from pytorch_lightning.demos.transformer import Transformer

        vocab = 33278
        inputs, target = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
        return Transformer(vocab_size=vocab), lambda m: F.nll_loss(m(inputs, target), target.reshape(-1)), {}

    def gru():
        class Tagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(1000, 128)
                self.rnn = nn.GRU(128, 256, num_layers=2)  # sequence first
                self.head = nn.Linear(256, 10)

            def forward(self, tokens):
                return self.head(self.rnn(self.emb(tokens))[0])

        tokens, labels = torch.randint(0, 1000, (seq, batch)), torch.randint(0, 10, (seq, batch))
        return Tagger(), lambda m: F.cross_entropy(m(tokens).reshape(-1, 10), labels.reshape(-1)), {"batch_axis": 1}

    def convnext():
        class Block(nn.Module):  # torchvision's CNBlock: depthwise 7x7, channels-last LayerNorm and MLP, layer scale
            def __init__(self, c):
                super().__init__()
                self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
                self.norm = nn.LayerNorm(c)
                self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
                self.gamma = nn.Parameter(torch.full((c,), 1e-6))

            def forward(self, x):
                y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
                return x + (self.gamma * y).permute(0, 3, 1, 2)

        class ConvNeXt(nn.Module):  # stages at 8x8 and 4x4 from 32x32 images (ConvNeXt's last stages at CIFAR size)
            def __init__(self):
                super().__init__()
                self.stem = nn.Conv2d(3, 64, 4, stride=4)
                self.stage1 = nn.Sequential(Block(64), Block(64))
                self.down = nn.Conv2d(64, 128, 2, stride=2)
                self.stage2 = nn.Sequential(Block(128), Block(128))
                self.head = nn.Linear(128, 10)

            def forward(self, x):
                return self.head(self.stage2(self.down(self.stage1(self.stem(x)))).mean((2, 3)))

        images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        return ConvNeXt(), lambda m: F.cross_entropy(m(images), labels), {}

    return {"nn.Transformer": transformer, "lightning-demo-transformer": lightning_demo, "gru-tagger": gru,
            "convnext-cifar": convnext}


def run(name: str, make: Callable[[], Case], full_table: bool, train: bool = False) -> None:
    torch.manual_seed(0)
    model, loss_of, kwargs = make()
    # Eval mode switches dropout off (gradients still flow); --train keeps it: the generic route then falls
    # back on modules whose own forward draws dropout (attention replays its draws).
    model.train(train)
    loss_of(model).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_of(model).backward()
    base = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    seng = SENG(model, update_freq=1, **kwargs)
    t0 = time.perf_counter()
    loss_of(model).backward()
    seng.step()
    refresh = time.perf_counter() - t0
    cov = seng.coverage()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"\n## {name} ({params / 1e6:.1f} M parameters)")
    if full_table:
        print(cov.table())
    else:
        for row in cov.fallbacks():
            print(f"  fallback: {row.module} ({row.type}, {row.parameters} parameters): {row.note}")
        routes: Dict[str, int] = {}
        for row in cov:
            if row.curvature:
                routes[row.route] = routes.get(row.route, 0) + row.parameters
        print("  routes: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in sorted(routes.items())))
        print("  " + cov.summary())
    print(f"  forward+backward {1e3 * base:.0f} ms; with SENG's refresh step {1e3 * refresh:.0f} ms "
          f"({refresh / base:.1f}x)")
    seng.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--only", nargs="*", default=None, help="architectures to run (default: all)")
    parser.add_argument("--full-tables", action="store_true", help="print every module's row")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train", action="store_true", help="train mode (dropout on) instead of eval mode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {**hf_cases(args.batch, args.seq), **torch_cases(args.batch, args.seq)}
    if not hf_cases(args.batch, args.seq):
        print("transformers is not installed (pip install '.[zoo]'): Hugging Face architectures skipped")
    for name, make in cases.items():
        if args.only is None or name in args.only:
            run(name, make, args.full_tables, args.train)


if __name__ == "__main__":
    main()

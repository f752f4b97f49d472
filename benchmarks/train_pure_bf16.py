"""Pure-bf16 training on CPU: does stochastic rounding make bfloat16 weights without an fp32 master
copy train like fp32? Two small models, each trained three times from the same initial weights and
data order with fusedreg.optim.AdamW (cpu backend):

  fp32 master    float32 parameters and moments, forward/backward under bfloat16 autocast
                 (the usual mixed precision: 16 B/param of optimizer-visible state)
  bf16 nearest   bfloat16 parameters and moments, updates rounded to nearest (8 B/param): an
                 update smaller than half a bfloat16 ulp of its weight is lost
  bf16 SR        bfloat16 parameters and moments, stochastic rounding (bf16_stochastic_round=True)

Models: the digits CNN of train_digits.py's data (scikit-learn's bundled 8x8 digits, no BatchNorm or
dropout: nothing random but the rounding) and a 2-layer GPT-style transformer on synthetic tokens
from a fixed random bigram chain (the best achievable loss is the chain's entropy, printed). The
learning rate decays (cosine, to 5% of its peak), the regime where round-to-nearest stalls.

    python benchmarks/train_pure_bf16.py [--out benchmarks/results/pure-bf16-cpu]

Writes <out>.png (loss curves), <out>.json and <out>.md (final losses, the machine).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

from fusedreg.bench.machine import machine_info, machine_label
from fusedreg.optim import AdamW

VARIANTS = ("fp32 master", "bf16 nearest", "bf16 SR")


# ----------------------------------------------------------------------------- models and data

def digits_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def digits_batches(steps: int, batch: int = 64, seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        yield x[idx], y[idx]


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc, self.out = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    def __init__(self, vocab: int = 64, width: int = 64, layers: int = 2, heads: int = 4, context: int = 32):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, width), torch.nn.Embedding(context, width)
        self.blocks = torch.nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.ln(self.blocks(x)))


def bigram_chain(vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """A fixed random transition matrix, each row concentrated on a few successors."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(vocab, vocab, generator=gen) * 2.5, dim=1)


def token_batches(chain: torch.Tensor, steps: int, batch: int = 16, context: int = 33, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        seq = [torch.randint(0, chain.shape[0], (batch,), generator=gen)]
        for _ in range(context - 1):
            seq.append(torch.multinomial(chain[seq[-1]], 1, generator=gen).squeeze(1))
        tokens = torch.stack(seq, 1)
        yield tokens[:, :-1], tokens[:, 1:]


def chain_entropy(chain: torch.Tensor) -> float:
    """Entropy rate (nats/token) of the chain from its stationary distribution: the loss floor."""
    pi = torch.full((chain.shape[0],), 1.0 / chain.shape[0], dtype=torch.float64)
    for _ in range(500):
        pi = pi @ chain.double()
    return float(-(pi[:, None] * chain.double() * chain.double().log()).sum())


# ----------------------------------------------------------------------------- training

def train(model, variant: str, batches, steps: int, peak_lr: float, loss_fn) -> list[float]:
    model = copy.deepcopy(model)
    bf16 = variant != "fp32 master"
    if bf16:
        model = model.to(torch.bfloat16)
    opt = AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, backend="cpu",
                state_dtype=torch.bfloat16 if bf16 else None, bf16_stochastic_round=variant == "bf16 SR")
    torch.manual_seed(0)  # the SR seeds: the same for every run of this variant
    losses = []
    for step, (x, y) in enumerate(batches):
        for group in opt.param_groups:  # cosine decay to 5% of the peak
            group["lr"] = peak_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if not bf16 else contextlib.nullcontext())
        with autocast:
            out = model(x.to(torch.bfloat16) if bf16 and x.is_floating_point() else x)
        loss = loss_fn(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def run(args) -> dict:
    torch.set_num_threads(1)
    results = {}
    chain = bigram_chain()
    experiments = {
        "digits CNN": (digits_model, lambda: digits_batches(args.digits_steps), args.digits_steps, 2e-3,
                       F.cross_entropy),
        "tiny GPT": (TinyGPT, lambda: token_batches(chain, args.gpt_steps), args.gpt_steps, 2e-3,
                     lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))),
    }
    for name, (make, batches, steps, lr, loss_fn) in experiments.items():
        torch.manual_seed(0)
        model = make()
        results[name] = {}
        for variant in VARIANTS:
            start = time.perf_counter()
            losses = train(model, variant, batches(), steps, lr, loss_fn)
            tail = losses[-max(1, steps // 10):]
            results[name][variant] = {"losses": losses, "final": sum(tail) / len(tail),
                                      "seconds": time.perf_counter() - start}
            print(f"{name:10s} {variant:13s} final loss (mean of last 10%) {results[name][variant]['final']:.4f}"
                  f"  ({results[name][variant]['seconds']:.0f} s)")
    results["tiny GPT"]["entropy floor"] = chain_entropy(chain)
    print(f"tiny GPT: the chain's entropy (loss floor) is {results['tiny GPT']['entropy floor']:.4f}")
    return results


def plot(results: dict, path: str, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("digits CNN", "tiny GPT")):
        floor = results[name].get("entropy floor", 0.0)  # the GPT's curves: loss above its floor
        for variant, style in zip(VARIANTS, ("k-", "r--", "b-")):
            losses = [v - floor for v in results[name][variant]["losses"]]
            ax.plot(smooth(losses, 25), style, lw=1.2,
                    label=f"{variant} (final {results[name][variant]['final']:.4f})")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (moving average of 25 steps)" if not floor else
                      f"loss - entropy floor ({floor:.3f}), moving average")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.suptitle(f"fusedreg AdamW: fp32 master vs pure bf16 (nearest / stochastic rounding) - {label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--digits-steps", type=int, default=1000)
    parser.add_argument("--gpt-steps", type=int, default=500)
    parser.add_argument("--out", default="benchmarks/results/pure-bf16-cpu")
    args = parser.parse_args()
    results = run(args)
    info = machine_info("cpu")
    label = machine_label(info)
    plot(results, args.out + ".png", label)
    summary = {name: {v: {"final_loss": r["final"], "seconds": r["seconds"]} for v, r in res.items()
                      if isinstance(r, dict)} for name, res in results.items()}
    summary["tiny GPT"]["entropy floor"] = results["tiny GPT"]["entropy floor"]
    doc = {"machine": info, "steps": {"digits CNN": args.digits_steps, "tiny GPT": args.gpt_steps},
           "final_loss_is": "mean training loss of the last 10% of steps", "results": summary}
    # the loss curves (5 significant digits), one line per curve
    curves = ",\n".join(f' "{n} / {v}": {json.dumps([float(f"{x:.5g}") for x in r["losses"]])}'
                         for n, res in results.items() for v, r in res.items() if isinstance(r, dict))
    with open(args.out + ".json", "w") as f:
        f.write(json.dumps(doc, indent=1)[:-2] + ',\n "curves": {\n' + curves + "\n }\n}\n")
    lines = [f"# Pure-bf16 AdamW on CPU ({label})", "",
             "Final training loss (mean of the last 10% of steps); lower is better.", "",
             "| model | " + " | ".join(VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    for name in ("digits CNN", "tiny GPT"):
        lines.append(f"| {name} | " + " | ".join(f"{results[name][v]['final']:.4f}" for v in VARIANTS) + " |")
    lines += ["", f"tiny GPT loss floor (entropy of its bigram chain): {results['tiny GPT']['entropy floor']:.4f}",
              "", f"{sum(r['seconds'] for res in results.values() for r in res.values() if isinstance(r, dict)):.0f} s "
              "for all six runs on one thread. Produced by `python benchmarks/train_pure_bf16.py`."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.png, .json, .md")


if __name__ == "__main__":
    main()

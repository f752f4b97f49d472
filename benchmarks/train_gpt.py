"""End to end on a GPU: a small GPT-style transformer on synthetic tokens, trained with torch's
dropout + AdamW(fused=True) + clip_grad_norm_ and with fusedreg's dropout_add + AdamW(max_grad_norm),
each eager and under torch.compile. Reports tokens/s and peak memory per variant (JSON + table).

    python benchmarks/train_gpt.py [--steps 30] [--json benchmarks/results/gpt-<gpu>.json]

The residual branches are where the fusion applies: torch computes x + dropout(attn(x)) as two
passes and keeps a mask; fusedreg's dropout_add does one pass and keeps only a seed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import fusedreg


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, p: float, fused: bool):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width, bias=not fused)  # fused: bias goes to dropout_add
        self.fc = torch.nn.Linear(width, 4 * width)
        self.out = torch.nn.Linear(4 * width, width, bias=not fused)
        self.proj_bias = torch.nn.Parameter(torch.zeros(width)) if fused else None
        self.out_bias = torch.nn.Parameter(torch.zeros(width)) if fused else None
        self.heads, self.p, self.fused = heads, p, fused

    def _residual(self, branch, x, bias):
        if self.fused:
            return fusedreg.dropout_add(branch, x, self.p, self.training, bias=bias)
        return x + F.dropout(branch, self.p, self.training)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)
        x = self._residual(self.proj(attn.transpose(1, 2).reshape(b, t, c)), x, self.proj_bias)
        return self._residual(self.out(F.gelu(self.fc(self.ln2(x)))), x, self.out_bias)


class GPT(torch.nn.Module):
    def __init__(self, vocab=8192, width=512, depth=8, heads=8, context=512, p=0.1, fused=False):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(vocab, width), torch.nn.Embedding(context, width)
        self.blocks = torch.nn.ModuleList(Block(width, heads, p, fused) for _ in range(depth))
        self.ln, self.head = torch.nn.LayerNorm(width), torch.nn.Linear(width, vocab, bias=False)
        self.drop = fusedreg.nn.Dropout(p) if fused else torch.nn.Dropout(p)

    def forward(self, idx):
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def run(fused: bool, compiled: bool, steps: int, batch: int, context: int, dtype) -> dict:
    torch.manual_seed(0)
    model = GPT(context=context, fused=fused).cuda()
    if fused:
        opt = fusedreg.optim.AdamW(model.parameters(), lr=3e-4, max_grad_norm=1.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, 8192, (batch, context + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not fused:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"fused": fused, "compiled": compiled, "tokens_per_s": steps * batch * context / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_gpt.py needs a CUDA device")
    rows = [run(fused, compiled, args.steps, args.batch, args.context, torch.bfloat16)
            for compiled in (False, True) for fused in (False, True)]
    print(f"{'variant':<28} {'tokens/s':>10} {'peak GiB':>9} {'loss':>7}")
    for r in rows:
        name = f"{'fusedreg' if r['fused'] else 'torch'}{' + compile' if r['compiled'] else ''}"
        print(f"{name:<28} {r['tokens_per_s']:>10.0f} {r['peak_memory_gib']:>9.2f} {r['final_loss']:>7.3f}")
    doc = {"machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "cuda": torch.version.cuda}, "config": vars(args), "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

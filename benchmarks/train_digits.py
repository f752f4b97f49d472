"""End to end on CPU: a small CNN with BatchNorm and Dropout on scikit-learn's bundled digits data,
trained twice from the same initial weights — once with torch's modules, AdamW and
clip_grad_norm_, once converted with fusedreg.nn.convert_modules and trained with
fusedreg.optim.AdamW(max_grad_norm=...) — printing and plotting both loss curves.

    python benchmarks/train_digits.py [--epochs 40] [--plot benchmarks/results/digits-cpu.png]

Dropout masks come from different random streams in the two runs, so the curves are not identical;
what must match is how well both learn.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import fusedreg

MAX_GRAD_NORM = 1.0


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Dropout(0.3),
        torch.nn.Linear(32 * 4 * 4, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
        torch.nn.Dropout(0.3), torch.nn.Linear(64, 10),
    )


def load_digits(seed: int = 0):
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def evaluate(model, x, y) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(model, optimizer, clip, data, epochs: int, batch_size: int = 64, seed: int = 0) -> dict:
    (x_train, y_train), (x_val, y_val) = data
    generator = torch.Generator().manual_seed(seed)
    history = {"train_loss": [], "val_loss": [], "val_acc": [], "seconds": 0.0}
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total, count = 0.0, 0
        for begin in range(0, len(order), batch_size):
            batch = order[begin:begin + batch_size]
            if len(batch) < 2:  # BatchNorm needs more than one value per channel
                continue
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            clip(model)
            optimizer.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        val_loss, val_acc = evaluate(model, x_val, y_val)
        history["train_loss"].append(total / count)
        history["val_loss"].append(val_loss)
        history["val_acc"].append(val_acc)
    history["seconds"] = time.perf_counter() - start
    return history


def compare(epochs: int, seed: int = 0, lr: float = 3e-3) -> dict[str, dict]:
    """Train the torch and the fusedreg version from identical weights; return both histories."""
    torch.manual_seed(seed)
    data = load_digits(seed)
    torch_model = make_model()
    fused_model = fusedreg.nn.convert_modules(copy.deepcopy(torch_model))
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=lr)
    fused_opt = fusedreg.optim.AdamW(fused_model.parameters(), lr=lr, max_grad_norm=MAX_GRAD_NORM)
    torch_clip = lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_GRAD_NORM)  # noqa: E731
    return {
        "torch": train(torch_model, torch_opt, torch_clip, data, epochs, seed=seed),
        "fusedreg": train(fused_model, fused_opt, lambda m: None, data, epochs, seed=seed),
    }


def plot(histories: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, style in (("torch", "-"), ("fusedreg", "--")):
        h = histories[name]
        epochs = range(1, len(h["train_loss"]) + 1)
        ax.plot(epochs, h["train_loss"], style, label=f"{name} train")
        ax.plot(epochs, h["val_loss"], style, label=f"{name} validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title(f"digits CNN on CPU (torch {torch.__version__}): torch vs fusedreg")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="benchmarks/results/digits-cpu.png")
    args = parser.parse_args()
    histories = compare(args.epochs, args.seed)
    print(f"{'epoch':>5}  {'torch train':>11}  {'torch val':>9}  {'fused train':>11}  {'fused val':>9}")
    for i in range(args.epochs):
        t, f = histories["torch"], histories["fusedreg"]
        print(f"{i + 1:>5}  {t['train_loss'][i]:>11.4f}  {t['val_loss'][i]:>9.4f}  "
              f"{f['train_loss'][i]:>11.4f}  {f['val_loss'][i]:>9.4f}")
    for name, h in histories.items():
        print(f"{name:>9}: validation accuracy {h['val_acc'][-1]:.4f}, {h['seconds']:.1f} s")
    plot(histories, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

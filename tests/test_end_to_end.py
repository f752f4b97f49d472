"""convert_modules, a whole converted training step under torch.compile, and a short version of the
digits comparison in benchmarks/train_digits.py."""
import copy
import importlib.util
import io
from pathlib import Path

import pytest
import torch

import fusedreg

REPO = Path(__file__).resolve().parent.parent


class _MyDropout(torch.nn.Dropout):
    """A user's subclass: user code, which convert_modules must leave alone."""


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Dropout(0.2), _MyDropout(0.1)),
        torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 6), torch.nn.BatchNorm1d(6, momentum=None),
        torch.nn.Dropout(0.3, inplace=True), torch.nn.Linear(6, 3),
        torch.nn.SyncBatchNorm(3, affine=False),
    )


def test_convert_modules_swaps_in_place_keeping_state():
    model = _model().double()
    model[1].eval()
    params = {name: p for name, p in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    converted = fusedreg.nn.convert_modules(model, backend="reference")
    assert converted is model
    assert type(model[1]) is fusedreg.nn.BatchNorm2d and type(model[6]) is fusedreg.nn.BatchNorm1d
    assert type(model[3][0]) is fusedreg.nn.Dropout and type(model[3][1]) is _MyDropout
    assert type(model[7]) is fusedreg.nn.Dropout and model[7].inplace and model[7].p == 0.3
    assert type(model[9]) is fusedreg.nn.SyncBatchNorm
    assert model[1].backend == "reference" and not model[1].training and model[6].momentum is None
    assert all(p is params[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype
               for k, v in model.state_dict().items())
    again = fusedreg.nn.convert_modules(model)
    assert again is model and type(model[1]) is fusedreg.nn.BatchNorm2d and model[1].backend == "reference"


def test_convert_modules_options_and_root():
    model = _model()
    fusedreg.nn.convert_modules(model, dropout=False)
    assert type(model[3][0]) is torch.nn.Dropout and type(model[1]) is fusedreg.nn.BatchNorm2d
    root = torch.nn.BatchNorm1d(5)
    new_root = fusedreg.nn.convert_modules(root)
    assert type(new_root) is fusedreg.nn.BatchNorm1d and new_root.weight is root.weight


def test_checkpoints_load_across_conversion():
    torch.manual_seed(0)
    torch_model = _model()
    x = torch.randn(8, 2, 5, 5)
    torch_model(x)  # move the running statistics away from their initial values
    buffer = io.BytesIO()
    torch.save(torch_model.state_dict(), buffer)
    fused_model = fusedreg.nn.convert_modules(_model())
    buffer.seek(0)
    fused_model.load_state_dict(torch.load(buffer, weights_only=True))
    torch_model.eval(), fused_model.eval()
    torch.testing.assert_close(fused_model(x), torch_model(x))
    back = _model()
    back.load_state_dict(fused_model.state_dict())
    back.eval()
    torch.testing.assert_close(back(x), torch_model(x))


def test_compiled_training_step_has_no_graph_break():
    torch.manual_seed(0)
    model = fusedreg.nn.convert_modules(torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 4)))
    optimizer = fusedreg.optim.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.5)
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert optimizer.last_grad_norm is not None and torch.isfinite(optimizer.last_grad_norm)
    assert model[1].num_batches_tracked.item() == 5


def test_digits_both_learn_and_agree():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("train_digits", REPO / "benchmarks" / "train_digits.py")
    train_digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_digits)
    histories = train_digits.compare(epochs=3)
    torch_acc, fused_acc = histories["torch"]["val_acc"][-1], histories["fusedreg"]["val_acc"][-1]
    assert torch_acc > 0.85 and fused_acc > 0.85
    assert abs(torch_acc - fused_acc) < 0.05
    for h in histories.values():
        assert h["train_loss"][-1] < h["train_loss"][0] / 3


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_cuda_graph_training_step(p):
    """Forward, backward, clip and capturable AdamW captured once and replayed: with p = 0 the
    parameters equal those of the same steps run eagerly; with p = 0.5 every replay draws a new
    dropout mask (the captured seed is redrawn in the graph)."""
    def build():
        torch.manual_seed(0)
        model = fusedreg.nn.convert_modules(torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(),
            torch.nn.Dropout(p), torch.nn.Linear(128, 8))).cuda()
        opt = fusedreg.optim.AdamW(model.parameters(), lr=1e-2, capturable=True, max_grad_norm=1.0)
        return model, opt

    x = torch.randn(256, 64, device="cuda")
    y = torch.randint(0, 8, (256,), device="cuda")

    def step(model, opt):
        opt.zero_grad(set_to_none=False)
        hidden = model[:4](x)
        loss = torch.nn.functional.cross_entropy(model[4](hidden), y)
        loss.backward()
        opt.step()
        return hidden

    model, opt = build()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: build, allocate optimizer state
            step(model, opt)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_hidden = step(model, opt)
    kept = []
    for _ in range(4):
        graph.replay()
        kept.append(static_hidden != 0)
    torch.cuda.synchronize()
    if p > 0:
        assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
        return
    eager_model, eager_opt = build()
    for _ in range(3 + 4):  # warm-up steps + replays (capture itself runs nothing)
        step(eager_model, eager_opt)
    for graphed, eager in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-5)

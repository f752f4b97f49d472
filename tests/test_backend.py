"""Backend selection rules (DESIGN §4)."""
import warnings

import pytest
import torch

import fusedreg
from fusedreg import _backend, _build
from fusedreg.backends import BackendUnavailable


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv("FUSEDREG_BACKEND", raising=False)
    fusedreg.set_backend(None)
    yield
    fusedreg.set_backend(None)


def test_available_reports_every_backend_with_a_reason():
    table = fusedreg.backends.available()
    assert set(table) == {"cuda", "triton", "cpu", "reference"}
    for usable, reason in table.values():
        assert isinstance(usable, bool) and isinstance(reason, str) and reason
    assert table["reference"][0]
    if not torch.cuda.is_available():
        assert not table["cuda"][0] and "CUDA" in table["cuda"][1]


def test_precedence_keyword_context_global_env(monkeypatch):
    monkeypatch.setenv("FUSEDREG_BACKEND", "reference")
    assert _backend.get_backend() == "reference"
    fusedreg.set_backend("auto")
    assert _backend.get_backend() == "auto"
    with fusedreg.use_backend("reference"):
        assert _backend.get_backend() == "reference"
        with fusedreg.use_backend("cpu"):
            assert _backend.get_backend() == "cpu"
        assert _backend.get_backend() == "reference"
        assert _backend.select("cpu", backend="reference") == "reference"
    assert _backend.get_backend() == "auto"


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedreg.set_backend("cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fusedreg.use_backend("fast"):
            pass
    monkeypatch.setenv("FUSEDREG_BACKEND", "gpu")
    with pytest.raises(ValueError, match="'gpu'"):
        _backend.select("cpu")


def test_explicit_backend_on_the_wrong_device_says_why():
    with pytest.raises(BackendUnavailable, match="takes CUDA tensors"):
        _backend.select("cpu", backend="cuda")
    with pytest.raises(BackendUnavailable, match="takes CPU tensors"):
        _backend.select("cuda", backend="cpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        _backend.select("cpu", backend="triton")


def test_auto_on_cpu_prefers_the_cpu_library():
    if _build.unbuildable_reason("cpu"):
        pytest.skip(_build.unbuildable_reason("cpu"))
    assert _backend.select("cpu") == "cpu"


def test_a_loaded_library_is_selected_without_checking_again(monkeypatch):
    """Once the cpu library is loaded, auto and "cpu" resolve from memory (a loaded library stays
    loaded); a name whose answer can change (triton: TRITON_INTERPRET) is checked on every call."""
    if _build.unbuildable_reason("cpu"):
        pytest.skip(_build.unbuildable_reason("cpu"))
    monkeypatch.setattr(_backend, "_resolved", {})
    assert _backend.select("cpu") == "cpu" and _backend.select(torch.device("cpu"), "cpu") == "cpu"

    def checked(*args, **kwargs):
        raise AssertionError("checked again")

    monkeypatch.setattr(_backend, "_reason", checked)
    assert _backend.select("cpu") == "cpu" and _backend.select("cpu", backend="cpu") == "cpu"
    with pytest.raises(AssertionError, match="checked again"):
        _backend.select("cpu", backend="triton")


def test_auto_falls_back_with_one_warning_and_explicit_raises(monkeypatch):
    def broken(kind, verbose=False):
        raise _build.BuildError(f"building fusedreg_{kind} failed: boom", "/tmp/some.log")

    monkeypatch.setattr(_build, "load_library", broken)
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_resolved", {})  # as in a process whose build failed
    with pytest.warns(RuntimeWarning, match="boom"):
        assert _backend.select("cpu") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.select("cpu") == "reference"  # warned once already
    with pytest.raises(BackendUnavailable, match="/tmp/some.log"):
        _backend.select("cpu", backend="cpu")


def test_selection_is_traceable_by_torch_compile():
    def pick(x):
        return x * 2 if _backend.select(x.device) == "reference" else x + 1

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    x = torch.ones(3)
    with fusedreg.use_backend("reference"):
        assert torch.equal(compiled(x), x * 2)
    expected = x * 2 if _backend.select("cpu") == "reference" else x + 1
    assert torch.equal(compiled(x), expected)

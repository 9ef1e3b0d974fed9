"""The method contract is one-way: methods score and choose, stores hold, the runtime drives both and applies.

Static checks (the source itself): core/method.py, core/contract.py and core/store.py never import the runtime
(core/cache.py); no method touches a cache or calls a store's mutating methods. Runtime checks: the view a method
gets is read-only, no registered method changes a store's tensors in place while it decides, and `apply_selection`
does what each kind of `Selection` says.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import held_tensors

import memfit
from memfit.api import make_cache
from memfit.core import cache as cache_mod
from memfit.core.cache import CompressedCache, apply_selection
from memfit.core.contract import LayerView, Selection
from memfit.core.method import all_methods
from memfit.core.store import KVLayer
from memfit.engine import generate, pad_left

ROOT = Path(memfit.__file__).parent
MUTATORS = {"keep", "keep_mask", "append", "select_batch", "trim_to_window", "load_state_dict", "finalize_step",
            "freeze"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # TYPE_CHECKING blocks included
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_contract_modules_never_import_the_runtime():
    for name in ("method.py", "contract.py", "store.py"):
        assert "memfit.core.cache" not in _imports(ROOT / "core" / name), name
    assert not {m for m in _imports(ROOT / "core" / "contract.py") if m.startswith("memfit")}


@pytest.mark.parametrize("path", sorted((ROOT / "methods").glob("*.py")), ids=lambda p: p.name)
def test_methods_never_call_back_into_the_cache_or_a_store(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            root, attr = node.value.id, node.attr
            assert root != "cache", f"{path.name}:{node.lineno}: a method never sees the cache (cache.{attr})"
            if root in ("layer", "target") and attr in MUTATORS:
                raise AssertionError(f"{path.name}:{node.lineno}: {root}.{attr}: return a Selection instead")
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                root = target
                while isinstance(root, (ast.Attribute, ast.Subscript)):
                    root = root.value
                into_store = root is not target and isinstance(root, ast.Name) and root.id in ("layer", "target")
                assert not into_store, (
                    f"{path.name}:{node.lineno}: a method does not write to a store (return Selection(state=...))")


def _layer(t: int = 10, b: int = 1, h: int = 2, d: int = 4) -> KVLayer:
    layer = KVLayer()
    values = torch.arange(t, dtype=torch.float32)[None, None, :, None].expand(b, h, t, d).clone()  # value = position
    layer.append(torch.randn(b, h, t, d), values, None)
    return layer


def _held(layer: KVLayer) -> list[int]:
    return layer.values[0, 0, :, 0].long().tolist()


def test_the_view_is_read_only():
    layer = _layer()
    layer.extras["s"] = torch.zeros(1, 2, 10)
    view = LayerView(layer)
    assert view.keys is layer.keys and view.num_slots == 10 and view.seen == 10 and not view.fused
    with pytest.raises(AttributeError):
        view.keys = torch.zeros(1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        view.extras["s"] = torch.ones(1, 2, 10)  # type: ignore[index]
    assert not hasattr(view, "keep") and not hasattr(view, "append")


def test_apply_selection_does_what_each_selection_says():
    keep = torch.tensor([4])
    scores = torch.arange(10, dtype=torch.float32).flip(0).expand(1, 2, 10)  # earlier tokens score higher

    layer = _layer()
    apply_selection(layer, Selection(state={"s": torch.ones(1, 2, 10)}), keep)  # state only: nothing evicted
    assert _held(layer) == list(range(10)) and layer.extras["s"].shape == (1, 2, 10)

    apply_selection(layer, Selection(scores), None)  # unlimited budget: scores keep everything
    assert layer.num_slots == 10

    protect = torch.zeros(1, 2, 10, dtype=torch.bool)
    protect[..., 9] = True
    apply_selection(layer, Selection(scores, protect, state={"s": torch.arange(10.0).expand(1, 2, 10)}), keep)
    assert _held(layer) == [0, 1, 2, 9]  # the protected token first, then the best scores, in position order
    assert layer.extras["s"][0, 0].tolist() == [0.0, 1.0, 2.0, 9.0]  # state written first, gathered with them

    apply_selection(layer, Selection(indices=torch.tensor([[[1, 3], [0, 2]]])), keep)  # explicit slots
    assert _held(layer) == [1, 9] and layer.values[0, 1, :, 0].long().tolist() == [0, 2]

    with pytest.raises(ValueError):
        Selection(scores, indices=torch.zeros(1, 2, 1, dtype=torch.long))


def test_no_method_changes_a_store_while_it_decides(llama, monkeypatch):
    """Every registered method (and a composition) on a tiny model: whatever the store holds when the method is
    asked is bit-identical when its answer is applied — the runtime is the only writer."""
    pending: dict[str, object] = {}

    class SpyView(LayerView):
        __slots__ = ()

        def __init__(self, store) -> None:
            super().__init__(store)
            pending["store"] = store
            # every tensor the store holds (quantized segments, extras...), with a copy to compare against
            pending["tensors"] = {k: (t, t.clone()) for k, t in held_tensors(store).items()}

    real_apply = CompressedCache._apply
    checked = []

    def spy_apply(self, decision, layer_idx=None, keep=None):
        if "store" in pending:
            pending.pop("store")
            for t, before in pending.pop("tensors").values():  # type: ignore[union-attr]
                assert torch.equal(t, before), "the method changed the store in place"
            checked.append(layer_idx)
        return real_apply(self, decision, layer_idx, keep)

    monkeypatch.setattr(cache_mod, "LayerView", SpyView)
    monkeypatch.setattr(CompressedCache, "_apply", spy_apply)
    ids, mask = pad_left([list(range(3, 43)), list(range(5, 30))])
    specs = [n for n, c in all_methods().items() if c.family not in ("quantization", "reference")]
    for spec in [*specs, "h2o+kivi"]:
        params = {"kivi.group_size": 16, "kivi.residual": 32} if spec == "h2o+kivi" else None
        checked.clear()
        generate(llama, ids, mask, make_cache(llama, spec, 0.4, params), max_new_tokens=3)
        assert checked, spec

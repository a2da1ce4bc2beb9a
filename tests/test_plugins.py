"""Plugins come from entry points; a broken one is reported with its package and never hides the rest."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

from mmops.core import plugin_registry
from mmops.core.interfaces import Encoder, Fusion
from mmops.core.plugin_registry import PluginError, check_all, discover, get_encoder, get_fusion


def test_builtins_register_through_entry_points():
    fusions, encoders = discover("fusion"), discover("encoder")
    assert {"concat", "product"} <= set(fusions) and {"hf_text", "cnn_image"} <= set(encoders)
    assert fusions["concat"].package == "mmops" and fusions["concat"].target.startswith("mmops_plugins.")
    assert issubclass(get_fusion("concat"), Fusion) and issubclass(get_encoder("cnn_image"), Encoder)


def test_unknown_plugin_lists_known_names():
    with pytest.raises(PluginError, match=r"unknown fusion 'nope'.*concat"):
        get_fusion("nope")


class _Dist:
    name, version = "acme-fusions", "1.2.3"


def _ep(name: str, value: str, group: str = "mmops.fusions") -> EntryPoint:
    ep = EntryPoint(name, value, group)
    return ep._for(_Dist()) if hasattr(ep, "_for") else ep


@pytest.fixture
def fake_entry_points(monkeypatch):
    real = plugin_registry.entry_points

    def install(*extra: EntryPoint):
        def entry_points(group: str, name: str | None = None):
            eps = [*real(group=group), *(e for e in extra if e.group == group)]
            return [e for e in eps if name is None or e.name == name]

        monkeypatch.setattr(plugin_registry, "entry_points", entry_points)
        plugin_registry.discover.cache_clear()
        plugin_registry._load.cache_clear()

    yield install
    plugin_registry.discover.cache_clear()
    plugin_registry._load.cache_clear()


def test_broken_plugins_are_reported_and_others_still_load(fake_entry_points):
    fake_entry_points(
        _ep("broken_import", "acme_does_not_exist.fusion:Thing"),
        _ep("not_a_fusion", "collections:OrderedDict"),
        _ep("concat", "acme_other:Concat"),  # clashes with the built-in
    )
    status = check_all("fusion")
    assert status["product"] is None
    assert "acme-fusions 1.2.3" in status["broken_import"] and "ModuleNotFoundError" in status["broken_import"]
    assert "not a subclass of mmops.core.interfaces.Fusion" in status["not_a_fusion"]
    assert "more than one package" in status["concat"] and "acme-fusions" in status["concat"]
    assert get_fusion("product") is not None


@pytest.mark.parametrize("name", ["concat", "product"])
@pytest.mark.parametrize("n_inputs", [2, 3])
def test_fusions_shapes_gradients_and_bad_input(name, n_inputs):
    dims = dict(list({"a": 5, "b": 7, "c": 3}.items())[:n_inputs])
    fusion = get_fusion(name)(dims, hidden=16)
    feats = {k: torch.randn(4, d, requires_grad=True) for k, d in dims.items()}
    out = fusion(feats)
    assert out.shape == (4, fusion.output_dim)
    out.sum().backward()
    assert all(p.grad is not None for p in fusion.parameters())
    with pytest.raises(ValueError, match="input 'a' must be"):
        fusion({**feats, "a": torch.randn(4, 99)})
    with pytest.raises(ValueError, match="was built for inputs"):
        fusion({"a": feats["a"]})


def test_a_plugin_that_exits_at_import_is_reported_and_does_not_end_plugins_list(
    fake_entry_points, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from mmops.cli.main import app

    (tmp_path / "acme_exits_at_import.py").write_text("raise SystemExit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(_ep("exits_at_import", "acme_exits_at_import:Thing"))
    status = check_all("fusion")
    assert "acme-fusions 1.2.3" in status["exits_at_import"] and "SystemExit" in status["exits_at_import"]
    assert status["concat"] is None
    plugin_registry._load.cache_clear()
    result = CliRunner().invoke(app, ["plugins", "list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "exits_at_import" in result.output and "SystemExit" in result.output

"""Plugin discovery through the accel.plugins entry points, with throwaway distributions in tmp_path."""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import accel
from accel.patching import PatchWarning, list_plugins, plugins as plugins_mod, unmet_requirement

GOOD = '''
import torch
from torch import nn
from accel.patching import Plugin, Rule

class Doubler(nn.Module):
    def forward(self, x):
        return x * 2

class FastDoubler(nn.Module):
    @classmethod
    def from_module(cls, m):
        return cls()

    def forward(self, x):
        return x + x

plugin = Plugin(
    name="myplug",
    rules=[Rule(name="Doubler->FastDoubler", op="doubler", classes=(Doubler,), build=FastDoubler.from_module)],
    description="test plugin",
)
'''

MODULES = ("myplug", "brokenplug", "factoryplug", "needyplug", "wrongplug")


def make_dist(root: Path, name: str, code: str, entry: str = "plugin") -> None:
    """A minimal installed distribution: the package and its .dist-info with an accel.plugins entry point."""
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(code))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[accel.plugins]\n{name} = {name}:{entry}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    for var in ("ACCEL_DISABLE", "ACCEL_PLUGINS", "ACCEL_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    for mod in MODULES:  # another test's tmp_path may have imported a same-named package
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    make_dist(tmp_path, "myplug", GOOD)
    make_dist(tmp_path, "brokenplug", 'raise ImportError("brokenplug needs libfoo")')
    yield tmp_path
    for mod in MODULES:
        sys.modules.pop(mod, None)
    plugins_mod._cache.clear()


def statuses() -> dict:
    return {s.name: s for s in list_plugins()}


def doubler_model():
    import myplug

    return nn.Sequential(nn.Linear(3, 3), myplug.Doubler())


def test_discovered_and_broken_reported(site):
    st = statuses()
    assert st["myplug"].loaded and st["myplug"].distribution == "myplug 0.1" and st["myplug"].target == "myplug:plugin"
    assert st["myplug"].plugin.name == "myplug"
    assert st["brokenplug"].failed
    assert st["brokenplug"].status == "error: ImportError: brokenplug needs libfoo"


def test_plugin_rule_applied_and_broken_one_reported(site):
    model = doubler_model()
    x = torch.randn(2, 3)
    ref = model(x)
    with pytest.warns(PatchWarning, match="brokenplug.*libfoo"):
        report = accel.patch(model)
    assert [(e.path, e.original, e.new, e.rule) for e in report.replaced] == [
        ("1", "Doubler", "FastDoubler", "Doubler->FastDoubler")]
    assert report.plugins["myplug"] == "loaded"
    assert report.plugins["brokenplug"] == "error: ImportError: brokenplug needs libfoo"
    assert "brokenplug" in str(report) and "Plugins (" in str(report)
    torch.testing.assert_close(model(x), ref)
    # built-in rules still run beside a broken plugin
    conv = nn.Sequential(nn.Conv1d(2, 2, 3, stride=2))
    with pytest.warns(PatchWarning):
        assert {e.reason for e in accel.patch(conv).skipped} == {"stride 2 != 1"}
    assert accel.unpatch(model) == 1 and type(model[1]).__name__ == "Doubler"


def test_strict_raises_naming_the_plugin(site):
    model = doubler_model()
    with pytest.raises(RuntimeError, match="brokenplug"):
        accel.patch(model, strict=True)
    assert type(model[1]).__name__ == "Doubler"


def test_block_list(site, monkeypatch):
    monkeypatch.setenv("ACCEL_DISABLE_PLUGINS", "myplug, brokenplug")
    st = statuses()
    assert st["myplug"].status == "disabled by ACCEL_DISABLE_PLUGINS"
    assert st["brokenplug"].status == "disabled by ACCEL_DISABLE_PLUGINS"
    assert "myplug" not in sys.modules  # a disabled plugin is never imported
    model = doubler_model()
    report = accel.patch(model, strict=True)  # nothing failed: strict does not raise
    assert len(report) == 0 and report.plugins["myplug"] == "disabled by ACCEL_DISABLE_PLUGINS"


def test_allow_list(site, monkeypatch):
    monkeypatch.setenv("ACCEL_PLUGINS", "myplug")
    st = statuses()
    assert st["myplug"].loaded and st["brokenplug"].status == "not in ACCEL_PLUGINS"
    model = doubler_model()
    report = accel.patch(model, strict=True)
    assert len(report) == 1
    monkeypatch.setenv("ACCEL_PLUGINS", "brokenplug")  # env changes take effect at the next call
    assert statuses()["myplug"].status == "not in ACCEL_PLUGINS"
    monkeypatch.setenv("ACCEL_PLUGINS", "myplug,ghost")
    assert statuses()["ghost"].status == "error: named in ACCEL_PLUGINS but no such entry point is installed"


def test_factory_wrong_type_and_unmet_requires(site):
    make_dist(site, "factoryplug", '''
        from accel.patching import Plugin
        def make():
            return Plugin(name="factoryplug")
    ''', entry="make")
    make_dist(site, "needyplug", '''
        from accel.patching import Plugin
        plugin = Plugin(name="needyplug", requires=("torch>=99", "surely-not-installed-dist>=1"))
    ''')
    make_dist(site, "wrongplug", "plugin = 42\n")
    st = {s.name: s for s in list_plugins(refresh=True)}
    assert st["factoryplug"].loaded
    assert st["needyplug"].status == f"skipped: needs torch>=99 (found {_torch_dist_version()})"
    assert not st["needyplug"].failed  # an unmet requirement is expected, not an error
    assert st["wrongplug"].failed and "expected an accel.patching.Plugin" in st["wrongplug"].status


def test_unmet_requirement_messages():
    assert unmet_requirement("torch>=2") is None
    assert unmet_requirement("surely-not-installed-dist>=1") == "needs surely-not-installed-dist>=1 (not installed)"
    assert unmet_requirement("torch<1; python_version < '3'") is None  # marker excludes it


@pytest.mark.parametrize("found,spec,ok", [
    ("4.57.1", ">=5", False), ("5.0.0", ">=5", True), ("5.1", ">=5,<6", True), ("6.0", ">=5,<6", False),
    ("2.14.1", "==2.14.*", True), ("2.13.0", "==2.14.*", False), ("1.4.2", "~=1.4", True), ("2.0", "~=1.4", False),
    ("1.0", "!=1.0", False), ("1.0rc1", ">=0.9", True), ("3", "", True),
])
def test_fallback_version_comparison(found, spec, ok):
    assert plugins_mod._simple_satisfies(found, spec) is ok


def _torch_dist_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch")

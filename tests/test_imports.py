"""The package imports no framework; ``__all__`` is exact; missing extras are named."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import spectral_monitor
import spectral_monitor.functional
import spectral_monitor.sinks
from spectral_monitor._imports import _EXTRAS, is_available, require
from spectral_monitor.errors import (
    BaseMismatchError,
    ConfigError,
    MissingDependencyError,
    NonFiniteError,
    SpectralMonitorError,
)

FRAMEWORKS = (
    "transformers",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "wandb",
    "tensorboard",
    "tensorboardX",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "matplotlib",
)


def run_python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_import_pulls_in_no_framework():
    out = run_python(
        """
        import json, sys
        import spectral_monitor
        import spectral_monitor.integrations, spectral_monitor.sinks.wandb, spectral_monitor.sinks.tensorboard
        from spectral_monitor import *  # noqa: F403
        print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
        """
    )
    loaded = set(json.loads(out))
    assert "spectral_monitor" in loaded and "torch" in loaded
    assert not loaded & set(FRAMEWORKS), sorted(loaded & set(FRAMEWORKS))


@pytest.mark.parametrize("module", [spectral_monitor, spectral_monitor.functional, spectral_monitor.sinks])
def test_all_is_exact_sorted_and_importable(module):
    names = module.__all__
    assert len(names) == len(set(names))
    assert list(names) == sorted(names)
    for name in names:
        assert getattr(module, name) is not None, name
    namespace: dict = {}
    exec(f"from {module.__name__} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(names)


def test_public_api_covers_the_core_objects():
    public = set(spectral_monitor.__all__)
    for name in ("SpectralMonitor", "MonitorConfig", "MonitorRun", "Decision", "StepReport", "Alert", "JsonlSink"):
        assert name in public
    for name in ("MissingDependencyError", "ConfigError", "BaseMismatchError", "NonFiniteError"):
        assert name in public
    assert isinstance(spectral_monitor.__version__, str)


def test_errors_subclass_builtins():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, SpectralMonitorError)
    assert issubclass(BaseMismatchError, ValueError)
    assert issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(MissingDependencyError, ImportError)


@pytest.mark.parametrize(("package", "extra"), sorted(_EXTRAS.items()))
def test_missing_dependency_error_names_the_extra(monkeypatch, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(MissingDependencyError) as info:
        require(package, "SomeFeature")
    msg = str(info.value)
    assert "SomeFeature" in msg and repr(package) in msg
    assert f"pip install 'spectral-monitor[{extra}]'" in msg
    assert isinstance(info.value.__cause__, ImportError)


def test_unknown_package_points_to_all_and_submodules_use_their_top_package(monkeypatch):
    with pytest.raises(MissingDependencyError, match=r"spectral-monitor\[all\]"):
        require("surely_not_a_real_package_xyz", "X")
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # already imported when test_lightning.py was collected
    with pytest.raises(MissingDependencyError, match=r"spectral-monitor\[lightning\]"):
        require("lightning.pytorch", "Y")
    assert not is_available("surely_not_a_real_package_xyz")
    assert is_available("torch")


def test_sinks_and_adapters_name_their_extra_when_the_package_is_missing():
    out = run_python(
        """
        import importlib, json, sys
        results = {}
        cases = [
            ("wandb", "spectral_monitor.sinks.wandb", "WandbSink"),
            ("tensorboard", "spectral_monitor.sinks.tensorboard", "TensorBoardSink"),
            ("transformers", "spectral_monitor.integrations.hf", None),
            ("lightning", "spectral_monitor.integrations.lightning", None),
            ("trl", "spectral_monitor.integrations.trl", None),
        ]
        from spectral_monitor.errors import MissingDependencyError
        for blocked, module, cls in cases:
            saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == blocked or k.startswith(blocked + ".")}
            sys.modules[blocked] = None
            sys.modules.pop(module, None)
            try:
                mod = importlib.import_module(module)
                if cls is not None:
                    getattr(mod, cls)()
                results[module] = "no error"
            except MissingDependencyError as exc:
                results[module] = str(exc)
            finally:
                del sys.modules[blocked]
                sys.modules.update(saved)
        print(json.dumps(results))
        """
    )
    results = json.loads(out)
    assert "spectral-monitor[wandb]" in results["spectral_monitor.sinks.wandb"]
    assert "spectral-monitor[tensorboard]" in results["spectral_monitor.sinks.tensorboard"]
    assert "spectral-monitor[hf]" in results["spectral_monitor.integrations.hf"]
    assert "spectral-monitor[lightning]" in results["spectral_monitor.integrations.lightning"]
    assert "spectral-monitor[trl]" in results["spectral_monitor.integrations.trl"]

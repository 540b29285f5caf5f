"""The Helm tests fail, naming the package, when one they need is missing: never a silent skip.

Each case runs pytest in a subprocess with the package shadowed by a module that raises
ImportError (earlier on PYTHONPATH than site-packages)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("module", "package", "target"), [
    ("kubernetes_validate", "kubernetes-validate", "tests/helm/test_chart.py"),
    ("helm_python", "helm-python-sdk", "tests/helm/test_chart.py::test_default_renders_no_crds"),
])
def test_a_missing_package_fails_the_helm_tests(module: str, package: str, target: str, tmp_path: Path) -> None:
    (tmp_path / f"{module}.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", target], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert f"{package} is not installed" in out, out[-3000:]
    assert "skipped" not in out.splitlines()[-1], out[-3000:]

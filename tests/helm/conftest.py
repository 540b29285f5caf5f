"""Render the chart with real Helm (v4, through helm-python-sdk's libhelm_c; no helm binary needed)."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "xdc-mirror"

Manifest = dict[str, Any]
# (template path, manifest) pairs, in template order
Render = Callable[..., list[tuple[str, Manifest]]]


def require(module: str, package: str) -> Any:
    """Import a package the set-up installs (extra `test`): when it is missing the tests that need
    it fail, naming it; they never skip."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{package} is not installed ({exc}); the Helm tests need it: "
                    "pip install -c constraints.txt -e '.[test]' (scripts/setup.sh does)", pytrace=False)


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    helm = require("helm_python", "helm-python-sdk")
    helm.disable_logging()  # "found symbolic link" (dags/) is expected, not news
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: Any) -> Render:
    """render(values=None) -> every manifest (as dicts) of `helm template xdc CHART [-f ...]`."""

    def _render(values: dict[str, Any] | None = None, *, name: str = "xdc") -> list[tuple[str, Manifest]]:
        rendered = chart.render(values=values, name=name, namespace="xdc", is_install=True)
        docs: list[tuple[str, Manifest]] = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                continue
            docs.extend((path, doc) for doc in yaml.safe_load_all(text) if doc is not None)
        return docs

    return _render

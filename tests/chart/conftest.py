"""Fixtures of the chart checks: one render per values file, shared by the whole session."""

from pathlib import Path

import pytest

from tests.chart.render import Rendering, load_values, render, scenario_files

# Each render generates a 4096-bit RSA key (Helm's genPrivateKey), so the session renders each
# values file once.
_renders: dict[str, Rendering] = {}

SCENARIOS = ["default", *(path.name for path in scenario_files())]


def rendering_of(scenario: str) -> Rendering:
    """Render the chart with the default values or with `helm/ztcqrs/ci/<scenario>`, once."""
    if scenario not in _renders:
        values = {} if scenario == "default" else load_values(scenario_path(scenario))
        _renders[scenario] = render(values)
    return _renders[scenario]


def scenario_path(scenario: str) -> Path:
    return next(path for path in scenario_files() if path.name == scenario)


@pytest.fixture(params=SCENARIOS)
def scenario(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name

"""The worked examples of docs/plugins.md run: the midpoint sampler it shows passes ctcore's sampler contract."""

from __future__ import annotations

import re
import types
from pathlib import Path

from ctcore.testing import check_component

PLUGINS_DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _python_block(marker: str) -> str:
    """The ```python block of docs/plugins.md whose first line is `marker`."""
    blocks = re.findall(r"^```python\n(.*?)^```", PLUGINS_DOC.read_text(encoding="utf-8"), re.M | re.S)
    found = [b for b in blocks if b.startswith(marker)]
    assert len(found) == 1, f"docs/plugins.md has {len(found)} python blocks starting with {marker!r}"
    return found[0]


def test_the_midpoint_sampler_of_plugins_md_passes_the_sampler_contract() -> None:
    module = types.ModuleType("ctcore_midpoint")
    exec(compile(_python_block("# ctcore_midpoint/__init__.py"), "docs/plugins.md", "exec"), module.__dict__)
    midpoint = module.Midpoint
    assert (midpoint.name, midpoint.model) == ("midpoint", "diffusion")
    assert module.ctcore_register_samplers() == [midpoint]
    check_component("sampler", midpoint)
    check_component("sampler", midpoint, steps=1)
    sampler = midpoint(midpoint.Options(), None)
    plan = sampler.plan(None, None, types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0, sigma_mid=()))
    assert (len(plan), plan[0], round(plan[-1], 12), sampler.evaluations(plan)) == (18, 80.0, 0.002, 35)

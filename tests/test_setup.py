"""The set-up files agree with each other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("-").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[a-z,]+\])?==([^\s]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(3)
    return out


def test_requirements_pin_torch_and_everything():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    req = pins(lines)
    assert req["torch"] == "2.14.1" and req["torchvision"] == "0.29.1"
    unpinned = [ln for ln in lines if ln.strip() and not ln.startswith("#") and "==" not in ln
                and not ln.startswith("-e")]
    assert not unpinned, f"unpinned requirements: {unpinned}"


def test_environment_yml_matches_requirements():
    req = pins((ROOT / "requirements.txt").read_text().splitlines())
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    env = pins(env_lines)
    python = [ln for ln in env_lines if re.match(r"\s*-\s*python=3\.11", ln)]
    assert python, "environment.yml must pin python=3.11"
    assert env == req, f"differ: {set(env.items()) ^ set(req.items())}"

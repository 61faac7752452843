"""The README's Quick start is what CI runs."""

import re
from pathlib import Path

import pytest
import torch
from helpers.aot import ENCODER_CONFIGS, encoder_config
from helpers.generic import GENERIC_TABLE, generic_config
from helpers.models import tiny_config

import dept_kernels

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_quick_start_has_two_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert "dept_kernels.bench" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    test_command = quick_start_commands()[1]
    assert test_command in (ROOT / ".ci" / "run").read_text()


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _tiny_from_pretrained(cls, *args, **kwargs):
    """`from_pretrained` without downloads: a tiny random model of the same architecture."""
    torch.manual_seed(0)
    model_type = cls.config_class.model_type
    tiny = encoder_config if model_type in ENCODER_CONFIGS else tiny_config
    tiny = generic_config if model_type in GENERIC_TABLE else tiny
    return cls(tiny(model_type)).eval()


@pytest.fixture
def tiny_hub(monkeypatch, tmp_path):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(_tiny_from_pretrained))
    monkeypatch.chdir(tmp_path)
    yield
    dept_kernels.set_backend(None)  # the README block sets the process default


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, tiny_hub):
    """Every Python block of the README runs as written (`from_pretrained` gives a tiny model
    of the same architecture)."""
    block = python_blocks()[index]
    exec(compile(block, f"README.md python block {index}", "exec"), {"__name__": "readme"})


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4

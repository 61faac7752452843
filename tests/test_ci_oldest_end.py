"""CI runs every test module that builds a Hugging Face model at the oldest end of the
supported transformers / PEFT range too (`.ci/run`, `.ci/constraints-oldest.txt`): a module
added without being listed there would test the newest end only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent
# The helper modules that build or wrap Hugging Face models.
MODEL_HELPERS = {"models", "aot", "encoders", "generic", "distributed", "peft_models"}


def builds_hf_models(path: Path) -> bool:
    """Whether the module imports transformers, PEFT or a model-building helper."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            if any(a.name.split(".")[0] in ("transformers", "peft") for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and node.module:
            top, _, rest = node.module.partition(".")
            if top in ("transformers", "peft"):
                return True
            if top == "helpers" and (
                rest.split(".")[0] in MODEL_HELPERS
                or (not rest and any(a.name in MODEL_HELPERS for a in node.names))
            ):
                return True
    return False


def oldest_end_modules() -> set[str]:
    """The test modules `.ci/run` runs in the oldest end's environment."""
    script = (TESTS.parent / ".ci" / "run").read_text()
    command = script[script.index(".venv-oldest/bin/python -m pytest") :]
    return set(re.findall(r"tests/(test_\w+\.py)", command))


def test_every_model_test_module_runs_at_the_oldest_end():
    model_modules = {p.name for p in TESTS.glob("test_*.py") if builds_hf_models(p)}
    assert len(model_modules) > 20, model_modules  # the detection itself works
    missing = sorted(model_modules - oldest_end_modules())
    assert not missing, f"add to .ci/run's oldest-end pytest command: {missing}"


def test_detection_sees_each_import_form(tmp_path):
    forms = {
        "import transformers": True,
        "from transformers import T5Config": True,
        "from peft import get_peft_model": True,
        "from helpers.models import tiny_model": True,
        "from helpers import aot, assert_close": True,
        "from helpers import DEVICE, assert_close": False,
        "from helpers.syncs import SyncCounter": False,
        "import torch": False,
    }
    for source, expected in forms.items():
        path = tmp_path / "test_x.py"
        path.write_text(source + "\n")
        assert builds_hf_models(path) is expected, source

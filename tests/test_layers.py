"""The layer contracts: import-linter's (pyproject.toml, run by scripts/lint_imports.sh) hold, and model and
kernel code never touches torch.distributed (import-linter cannot forbid a sub-module of an external
package, so that one is checked here on the source text, which also catches `torch.distributed.x` calls
without an import of their own)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/lint_imports.sh")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in out.stdout


def _distributed_uses(tree: ast.AST) -> list[int]:
    """Line numbers that import or reach torch.distributed or deepspeed."""
    bad = ("torch.distributed", "deepspeed")
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.startswith(bad) for a in node.names):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (
                node.module.startswith(bad)
                or (node.module == "torch" and any(a.name == "distributed" for a in node.names))
            )
        ):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "distributed"
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ):
            lines.append(node.lineno)
    return lines


def test_model_and_kernels_never_use_torch_distributed_or_deepspeed():
    offenders = []
    for folder in (ROOT / "albef_ds/model", ROOT / "kernels"):
        for f in sorted(folder.rglob("*.py")):
            offenders += [f"{f.relative_to(ROOT)}:{n}" for n in _distributed_uses(ast.parse(f.read_text()))]
    assert not offenders, offenders


def test_the_check_sees_each_form():
    src = "\n".join(
        [
            "import torch.distributed as d",
            "from torch import distributed",
            "import deepspeed",
            "torch.distributed.barrier()",
        ]
    )
    assert sorted(_distributed_uses(ast.parse(src))) == [1, 2, 3, 4]


def test_megatron_te_and_apex_are_refused_anywhere_in_the_package(tmp_path):
    """README, "megatron-core and NVIDIA apex": measured and not used, so an import of either (or of
    Transformer Engine) in any module breaks a contract, whether or not the package is installed."""
    for name in ("kernels", "launcher", "scripts"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copytree(
        ROOT / "albef_ds", tmp_path / "albef_ds", ignore=shutil.ignore_patterns("kernels", "launcher")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "albef_ds/model/ops.py", "a") as f:
        f.write("\n\ndef _probe():\n    import megatron.core\n\n    return megatron.core\n")
    with open(tmp_path / "albef_ds/train/engine.py", "a") as f:
        f.write("\n\ndef _probe():\n    import apex.optimizers\n    import transformer_engine.pytorch\n")
    out = subprocess.run(
        ["bash", str(tmp_path / "scripts/lint_imports.sh")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    for line in (
        "albef_ds.model.ops -> megatron",
        "albef_ds.train.engine -> apex",
        "albef_ds.train.engine -> transformer_engine",
    ):
        assert line in out.stdout, out.stdout[-3000:]

"""The layers hold: moalign/ is pure (no Ray, vLLM or DeepSpeed, even through what it imports),
and no command-line script imports another."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_moalign_module_imports_without_ray_vllm_or_deepspeed():
    code = (
        "import importlib, pkgutil, sys, moalign\n"
        "for m in pkgutil.walk_packages(moalign.__path__, 'moalign.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'deepspeed'))\n"
        "print(' '.join(bad)); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_script_imports_another():
    scripts = {p.stem: p for p in REPO.glob("*.py")}
    scripts |= {f"{p.parent.name}.{p.stem}": p for d in ("benchmarks", "deploy") for p in (REPO / d).glob("*.py")}
    found = []
    for name, path in scripts.items():
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found += [f"{path.relative_to(REPO)} imports {m}" for m in modules if m in scripts and scripts[m] != path]
    assert found == []

"""Importing deft_jax from a source tree that was never built says where it looked and how to fix it."""

import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_unbuilt_source_tree_explains_itself(tmp_path):
    tree = tmp_path / "checkout"
    shutil.copytree(ROOT / "deft_jax", tree / "deft_jax",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copy(ROOT / "CMakeLists.txt", tree / "CMakeLists.txt")
    # An editable install's import hook would redirect to the built tree: take it out.
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path "
            "if 'editable' not in type(f).__module__]; sys.path.insert(0, '.'); import deft_jax")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    err = proc.stderr
    assert str(tree / "deft_jax") in err, err
    assert "never built" in err and "pip install" in err, err

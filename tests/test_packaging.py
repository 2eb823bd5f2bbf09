"""What a user installs and imports: the runtime dependencies are the op's (jax, numpy), flax is an
extra imported only with deft_jax.linen / deft_jax.nnx, and each extra covers what its code
imports."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _names(requirements: list[str]) -> set[str]:
    """Distribution names of requirement strings ("flax>=0.10" -> "flax")."""
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def _run(code: str) -> subprocess.CompletedProcess:
    # Not from the repository's root: `python -c` puts the working directory first on sys.path,
    # where the unbuilt source tree would shadow the installed package.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT / "tests", timeout=120)


def test_runtime_dependencies_are_the_ops():
    """jax, numpy and OpenBLAS (the CPU fused forward's GEMM, a private copy loaded at run time)."""
    assert _names(_project()["dependencies"]) == {"jax", "jaxlib", "numpy", "scipy-openblas32"}


def test_extras():
    extras = {k: _names(v) for k, v in _project()["optional-dependencies"].items()}
    assert extras["flax"] == {"flax"}
    assert {"flax", "optax", "matplotlib", "tqdm"} <= extras["examples"]
    assert {"matplotlib", "tqdm"} <= extras["bench"]
    assert {"flax", "optax", "hypothesis", "pytest", "pytest-xdist", "matplotlib", "tqdm",
            "flatbuffers"} <= extras["test"]


def test_import_deft_jax_imports_no_optional_package():
    r = _run("import sys, deft_jax\n"
             "deft_jax.deform_conv2d, deft_jax.reference, deft_jax.export\n"
             "loaded = sorted({'flax', 'optax', 'matplotlib', 'tqdm', 'orbax'} & set(sys.modules))\n"
             "assert not loaded, loaded")
    assert r.returncode == 0, r.stderr


def test_linen_is_imported_on_first_use():
    r = _run("import sys, deft_jax\n"
             "assert 'flax' not in sys.modules\n"
             "layer = deft_jax.linen.DeformConv(features=4, kernel_size=(3, 3))\n"
             "assert 'flax' in sys.modules and 'deft_jax.linen' in sys.modules")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("statement", ["deft_jax.linen", "import deft_jax.linen",
                                       "from deft_jax import linen",
                                       "from deft_jax.linen import DeformConv"])
def test_linen_without_flax_names_the_extra(statement):
    # sys.modules["flax"] = None makes `import flax` fail as if it were not installed.
    r = _run("import sys\nsys.modules['flax'] = None\nimport deft_jax\n"
             f"try:\n    {statement}\nexcept ImportError as e:\n    print(e)\n"
             "else:\n    raise SystemExit('no ImportError')")
    assert r.returncode == 0, r.stderr
    assert 'pip install "deft_jax[flax]"' in r.stdout and "deft_jax.linen" in r.stdout


def test_unknown_attribute_is_an_attribute_error():
    import deft_jax

    with pytest.raises(AttributeError, match="no_such_thing"):
        deft_jax.no_such_thing  # noqa: B018
    assert "linen" in dir(deft_jax)


def _third_party_imports(path: pathlib.Path, local: set[str]) -> set[str]:
    """Top-level modules `path` imports that are neither stdlib, deft_jax, nor in `local`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"deft_jax"} - local


@pytest.mark.parametrize("extra,paths", [
    ("examples", ["examples/*.py"]),
    ("bench", ["benchmarks/bench_layers.py"]),
    ("test", ["tests/*.py"]),
])
def test_each_extra_covers_its_imports(extra, paths):
    project = _project()
    provided = _names(project["dependencies"]) | _names(project["optional-dependencies"][extra])
    files = [f for p in paths for f in sorted(ROOT.glob(p))]
    assert files
    # Modules of the tree imported by name: the tests' helpers and examples/ (on sys.path).
    local = {f.stem for d in ("tests", "examples") for f in (ROOT / d).glob("*.py")}
    # torch/torchvision are optional comparisons, imported inside try/except ImportError.
    optional = {"torch", "torchvision"}
    for f in files:
        needed = _third_party_imports(f, local) - optional  # import names = distribution names here
        assert needed <= provided, f"{f.relative_to(ROOT)} imports {sorted(needed - provided)}, " \
                                   f"not in the {extra!r} extra"

"""Optional dependencies: a clear error naming the extra that installs a missing package."""

from __future__ import annotations

import importlib.util


def check_installed(package: str, module: str, extra: str) -> None:
    """ImportError unless ``package`` can be imported; the message names ``module`` (what needs it)
    and the pip extra of deft_jax that installs it."""
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{module} needs {package}, which is not installed: "
                          f'pip install "deft_jax[{extra}]"')

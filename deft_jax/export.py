"""``jax.export`` support: the safety checks a program using the native op must disable.

``jax.export`` refuses custom calls whose targets are not on its list of stable ones, because it
cannot promise that a serialized call will find a compatible handler later. deft_jax's targets are
versioned by name (e.g. ``deft_deform_conv2d_fwd_cuda_v5``: any change of operands, results or
attribute schema gets a new name), so the promise is ours to keep; disabling the check for exactly
these targets is safe.

Example:
    >>> import deft_jax.export
    >>> checks = deft_jax.export.disabled_safety_checks()
    >>> exported = jax.export.export(jax.jit(f), disabled_checks=checks)(x)
    >>> blob = exported.serialize()
    >>> # Later, in a process that has imported deft_jax (which registers the targets with XLA):
    >>> y = jax.export.deserialize(blob).call(x)

The FFI attributes (geometry and the tile configuration chosen at trace time for the tracing
process's default backend) are frozen into the serialized module. Programs that use
``implementation="xla"`` contain no custom call and need no disabled check.
"""

from __future__ import annotations

import jax

from . import _ffi

__all__ = ["disabled_safety_checks"]


def disabled_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
    """``DisabledSafetyCheck.custom_call`` for each deft_jax FFI target (forward and backward),
    to pass as ``jax.export.export(..., disabled_checks=...)``."""
    return [jax.export.DisabledSafetyCheck.custom_call(target) for target in _ffi.TARGETS]

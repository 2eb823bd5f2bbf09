"""``jax.export`` support: the safety checks a program using the native op must disable.

``jax.export`` refuses custom calls whose targets are not on its list of stable ones, because it
cannot promise that a serialized call will find a compatible handler later. deft_jax's targets are
versioned by name (e.g. ``deft_deform_conv2d_fwd_cuda_v6``: any change of operands, results or
attribute schema gets a new name), so the promise is ours to keep; disabling the check for exactly
these targets is safe.

Example:
    >>> import deft_jax.export
    >>> checks = deft_jax.export.disabled_safety_checks()
    >>> exported = jax.export.export(jax.jit(f), disabled_checks=checks)(x)
    >>> blob = exported.serialize()
    >>> # Later, in a process that has imported deft_jax (which registers the targets with XLA):
    >>> y = jax.export.deserialize(blob).call(x)

Several platforms: ``jax.export.export(..., platforms=("cpu", "cuda"))`` lowers each platform's
own call (the CPU column route; on CUDA the route tiling.choose_route picks for the shape), each
with its own FFI attributes, in one
serialized module (the op traces one call per platform whose module is built and
``lax.platform_dependent`` picks the branch). The CUDA tile choice is made at trace time: for the
tracing process's GPU, or, when it has none (exporting on a CPU host), for an H100 (132 SMs,
compute capability 9.0) — ops._EXPORT_GPU. Lowering for CUDA needs the CUDA module, i.e. a
deft_jax built with nvcc, in the exporting process.

Compatibility promise: a target name never changes meaning. A serialized program runs with any
deft_jax that still registers its targets; a release that changes a target's operands, results
or attributes adds a new name (and may drop old ones, which then fails loudly at load time with
XLA's "no FFI handler" error, never silently). Programs that use ``implementation="xla"``
contain no custom call and need no disabled check.
"""

from __future__ import annotations

import jax

from . import _ffi

__all__ = ["disabled_safety_checks"]


def disabled_safety_checks() -> list[jax.export.DisabledSafetyCheck]:
    """``DisabledSafetyCheck.custom_call`` for each deft_jax FFI target (forward and backward),
    to pass as ``jax.export.export(..., disabled_checks=...)``."""
    return [jax.export.DisabledSafetyCheck.custom_call(target) for target in _ffi.TARGETS]

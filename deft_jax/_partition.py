"""How the native forward and backward compose with vmap and with sharded jit.

The native forward / backward of a call's route: "columns" (deft_jax/_columns.py: the platform's
sampler and col2im custom calls around XLA's dots, in a loop over chunks of images; CPU and CUDA)
or "fused" (the fused CUDA custom calls; on CPU the fused forward, deft_jax/_ffi.py).

vmap: ``custom_vmap`` moves the vmapped axis in front and calls the implementation with leading
batch dims (every operand gets them; an unbatched operand is broadcast). Both implementations
treat leading dims as independent problems with their own kernel, so vmap over a batch and vmap
over independent layers are both one custom call (per chunk on CPU), not a loop over problems.

Sharding: ``custom_partitioning`` with a Shardy sharding rule. Only the image axis N may be
sharded (data parallelism); every other axis is replicated. Each device runs the implementation
on its shard; the backward all-reduces the kernel cotangent over the devices that share N. No
operand is all-gathered. On one device the partitioning wrapper is inlined and costs nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _columns, _ffi

# Shardy factor names for the trailing dims; leading (vmap) dims are "...".
_X, _OFF, _MASK, _KER, _Y = "n h w c", "n i j g", "n i j m", "a b d o", "n i j o"


def _rank(t) -> int:
    return len(t.shape)


def _image_axis_spec(arg_shapes):
    """Mesh axes sharding N of x (or None), from x's sharding."""
    x = arg_shapes[0]
    lead = len(x.shape) - 4
    spec = tuple(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else ()
    return spec[lead] if len(spec) > lead else None


def _spec(rank: int, lead: int, n_axes, batched: bool) -> P:
    dims = [None] * rank
    if batched and rank >= lead + 4:
        dims[lead] = n_axes
    return P(*dims)


def _shardings(mesh, shapes, lead, n_axes, batched):
    return tuple(NamedSharding(mesh, _spec(len(s.shape), lead, n_axes, b))
                 for s, b in zip(shapes, batched))


# ---------------------------------------------------------------- forward

def _fwd_impl(x, offset, mask, kernel, call):
    if call.route == "columns":
        return _columns.forward(x, offset, mask, kernel, call)
    out_shape = (*x.shape[:-3], *call.out_shape[1:])
    if call.platform == "cpu":
        return _ffi.cpu_fused_forward(x, offset, mask, kernel, call.attr_dict(), out_shape)
    return _ffi.forward(x, offset, mask, kernel, call.attr_dict(), out_shape)


_fwd_cp = custom_partitioning(_fwd_impl, static_argnums=(4,))


def _fwd_rule(call, mesh, value_types, result_types):
    del call, mesh, result_types
    mask = _MASK if _rank(value_types[2]) == _rank(value_types[0]) else "z"
    return f"... {_X}, ... {_OFF}, ... {mask}, ... {_KER} -> ... {_Y}"


def _fwd_infer(call, mesh, arg_shapes, result_shape):
    lead = len(arg_shapes[0].shape) - 4
    return NamedSharding(mesh, _spec(len(result_shape.shape), lead, _image_axis_spec(arg_shapes), True))


def _fwd_partition(call, mesh, arg_shapes, result_shape):
    lead = len(arg_shapes[0].shape) - 4
    n_axes = _image_axis_spec(arg_shapes)
    args = _shardings(mesh, arg_shapes, lead, n_axes, (True, True, True, False))
    out = NamedSharding(mesh, _spec(len(result_shape.shape), lead, n_axes, True))

    def lower(x, offset, mask, kernel):
        return _fwd_impl(x, offset, mask, kernel, call)

    return mesh, lower, out, args


_fwd_cp.def_partition(partition=_fwd_partition, infer_sharding_from_operands=_fwd_infer,
                      sharding_rule=_fwd_rule)

# ---------------------------------------------------------------- backward

def _bwd_impl(x, offset, mask, kernel, dy, call):
    if call.route == "columns":
        return _columns.backward(x, offset, mask, kernel, dy, call)
    return _ffi.backward(x, offset, mask, kernel, dy, call.attr_dict())


_bwd_cp = custom_partitioning(_bwd_impl, static_argnums=(5,))


def _bwd_rule(call, mesh, value_types, result_types):
    del call, mesh, result_types
    mask = _MASK if _rank(value_types[2]) == _rank(value_types[0]) else "z"
    ins = f"... {_X}, ... {_OFF}, ... {mask}, ... {_KER}, ... {_Y}"
    return f"{ins} -> ... {_X}, ... {_OFF}, ... {mask}, ... {_KER}"


def _bwd_infer(call, mesh, arg_shapes, result_shape):
    lead = len(arg_shapes[0].shape) - 4
    return _shardings(mesh, result_shape, lead, _image_axis_spec(arg_shapes), (True, True, True, False))


def _bwd_partition(call, mesh, arg_shapes, result_shape):
    lead = len(arg_shapes[0].shape) - 4
    n_axes = _image_axis_spec(arg_shapes)
    args = _shardings(mesh, arg_shapes, lead, n_axes, (True, True, True, False, True))
    outs = _shardings(mesh, result_shape, lead, n_axes, (True, True, True, False))

    def lower(x, offset, mask, kernel, dy):
        dx, doffset, dmask, dkernel = _bwd_impl(x, offset, mask, kernel, dy, call)
        if n_axes is not None:  # each shard saw part of the images: sum the kernel cotangent
            dkernel = jax.lax.psum(dkernel, n_axes)
        return dx, doffset, dmask, dkernel

    return mesh, lower, outs, args


_bwd_cp.def_partition(partition=_bwd_partition, infer_sharding_from_operands=_bwd_infer,
                      sharding_rule=_bwd_rule)

# ---------------------------------------------------------------- vmap

def _vmappable(fn):
    """fn(*arrays), arrays with equal leading dims, made vmappable by adding a leading dim."""
    wrapped = jax.custom_batching.custom_vmap(fn)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(args, in_batched)]
        out = _vmappable(fn)(*args)
        return out, jax.tree.map(lambda _: True, out)

    return wrapped


def forward(x, offset, mask, kernel, call):
    """y of the native forward; mask is the (0,) placeholder without modulation."""
    return _vmappable(lambda x, o, m, k: _fwd_cp(x, o, m, k, call))(x, offset, mask, kernel)


def backward(x, offset, mask, kernel, dy, call):
    """(dx, doffset, dmask, dkernel) of the native backward."""
    return _vmappable(lambda x, o, m, k, g: _bwd_cp(x, o, m, k, g, call))(x, offset, mask, kernel, dy)

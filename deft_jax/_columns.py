"""The column route: the native sampler writes a bounded chunk of columns, XLA's dot reduces it.

The CPU's route, and the GPU's for GEMM-dominated layers (tiling.choose_route): one program for
both platforms, whose sampler and col2im are the platform's custom calls (C++ on XLA's intra-op
thread pool; CUDA kernels, with cuBLAS doing the dots). Per chunk (read in place by the native
calls, which take the chunk's first output row or image as an operand),

  forward    cols = sample_columns(x, offset, mask)          [rows, Wo, K, C]  (native)
             y    = cols . kernel                             XLA's dot
  backward   cols  = sample_columns(...)                      [b, Ho, Wo, K, C], recomputed
             dW   += cols^T . dy                              XLA's dot, float32 (float64) sum
             dcols = dy . kernel^T                            XLA's dot, float32 (float64)
             dx, doffset, dmask = col2im(x, offset, mask, dcols)   (native)

The forward's chunk is whole images where they fit its budget (``NativeCall.chunk_rows``, in
output rows; tiling.cpu_forward_chunk_rows on CPU), else a run of output rows over the batch's
N * Ho; the backward's is whole images (``NativeCall.chunk``), or on CPU, for an image past 32 MiB
of columns, runs of that image's rows (``NativeCall.bwd_rows``). All come from column-memory
budgets, so the extra memory is bounded independently of the batch: a batch larger than one
chunk runs as a loop over equal chunks plus at most one smaller one. Feature groups are a grouped contraction, as in the
reference; offset groups are inside the sampler. The dots take ``precision`` and accumulate in
float32 (float64 for float64). On CPU every piece is deterministic run to run: the C++ fixes the
order of every sum (for any thread count), the kernel cotangent sums the chunks in order, and
XLA's dots are deterministic for a given intra-op thread count. On GPU the col2im scatters dx
with float atomics, or with ``deterministic`` in 64-bit fixed point (csrc/cuda/columns.cu).

Arrays may carry leading dims (from vmap, deft_jax/_partition.py): independent problems, each with
its own kernel; the sampler treats them as more images, the dots as a batch dimension.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from . import _ffi


def _fold(a, lead: int):
    """[*lead dims, ...] -> [Z, ...] with Z the product of the leading dims."""
    return a.reshape((math.prod(a.shape[:lead]), *a.shape[lead:]))


def _chunk_size(n: int, z: int, chunk: int) -> int:
    """Images (or rows) per chunk: the budget's `chunk` of one problem, shared by the z problems,
    and spread evenly over the chunks that takes (32 images in chunks of at most 23: 16 + 16)."""
    most = max(1, min(n, chunk // max(z, 1)))
    return -(-n // -(-n // most))


def _for_chunks(n: int, b: int, step, carry, ins, unroll: bool):
    """carry = step(start, size, carry, ins) for chunks [start, start + size) covering [0, n):
    first the remainder chunk (the batch's last n % b images), then the n // b full chunks
    (static sizes); ``ins`` are the arrays the steps read.

    The remainder runs first: run after the loop, its update of the loop's result made XLA copy
    the whole result (temporary memory then grew with the batch).

    The full chunks are a fori_loop, or with ``unroll`` (the GPU) one step each in sequence, each
    chunk's start computed from the previous chunk's results (``_after``), so XLA cannot start a
    chunk's sampler before the previous chunk is done and its columns stay the only ones alive.
    (Optimization barriers between the steps did not do it: XLA removes them before it schedules,
    and XLA:CPU then ran every sampler first, temporary memory growing with the batch.) XLA GPU
    (jax 0.11.2) fails to compile the backward's loop ("IndexError: absl::container_internal::
    raw_hash_map<>::at" at compile time, with or without command buffers; the forward's loop
    compiles): unrolled, it compiles and gives the same results (H200, 5 images in chunks of 2)."""
    full, rem = divmod(n, b)
    starts = ([(full * b, rem)] if rem else []) + [(i * b, b) for i in range(full)]
    if unroll or full <= 1:
        for i, (start, size) in enumerate(starts):
            if unroll and i > 0:
                start = start + _after(carry)
            carry = step(start, size, carry, ins)
        return carry
    if rem:
        carry = step(full * b, rem, carry, ins)
    return lax.fori_loop(0, full, lambda i, c: step(i * b, b, c, ins), carry)


def _after(tree):
    """An int32 zero that XLA can only compute once every array of ``tree`` exists: it reads each
    array's first element: max(-isnan, 0) is always 0, but XLA does not fold it."""
    flags = [jnp.isnan(a.reshape(-1)[0]).astype(jnp.int32) for a in jax.tree.leaves(tree) if a.size]
    return jnp.maximum(-sum(flags), 0) if flags else 0


def _images(a, start, size):
    """Images [start, start + size) of a [Z, N, ...] array (start may be traced)."""
    if size == a.shape[1]:
        return a
    return lax.dynamic_slice_in_dim(a, start, size, axis=1)


def _put(a, update, start):
    if update.shape == a.shape:
        return update
    return lax.dynamic_update_slice_in_dim(a, update, start, axis=1)


def _shapes(x, kernel):
    z, _, _, _, c = x.shape
    _, kh, kw, cig, cout = kernel.shape
    fg = c // cig
    return z, kh * kw, fg, cig, cout // fg


def _sample(x, offset, mask, start, shape, call, with_mask):
    """cols [z, b, R, Wo, K, C] of output rows [start * R, (start + b) * R), shape = (b, R)
    (R = Ho: images [start, start + b)), read in place from the whole arrays."""
    return _ffi.sample_columns(x, offset, mask if with_mask else _ffi.mask_placeholder(x.dtype),
                               start, shape, call.attr_dict(), call.platform)


def _dot(a, b, contract: tuple[int, int], call, acc):
    """dot_general of [z, ...] operands over batch dim 0, contracting one dim of each; for z = 1
    the plain 2D product (XLA:CPU's GEMM takes it directly)."""
    if a.shape[0] == 1:
        out = lax.dot_general(a[0], b[0], (((contract[0] - 1,), (contract[1] - 1,)), ((), ())),
                              precision=call.precision, preferred_element_type=acc)
        return out[None]
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((0,), (0,))),
                           precision=call.precision, preferred_element_type=acc)


def _forward_dot(cols, wk, call, acc):
    """y [z, b, Ho, Wo, C_out] = cols [z, b, Ho, Wo, K, C] . wk [z, K, C/fg, fg, C_out/fg]."""
    z, b, ho, wo, k, c = cols.shape
    _, _, cig, fg, cog = wk.shape
    if fg == 1:  # one GEMM [b Ho Wo, K C] x [K C, C_out]
        y = _dot(cols.reshape(z, b * ho * wo, k * c), wk.reshape(z, k * c, cog), (2, 1), call, acc)
        return y.reshape(z, b, ho, wo, cog)
    y = jnp.einsum("znhwkfc,zkcfo->znhwfo", cols.reshape(z, b, ho, wo, k, fg, cig), wk,
                   precision=call.precision, preferred_element_type=acc)
    return y.reshape(z, b, ho, wo, fg * cog)


def _dcols_dot(dy, wk, call, acc):
    """dcols [z, b, Ho, Wo, K, C] = dy [z, b, Ho, Wo, C_out] . wk^T, in acc."""
    z, b, ho, wo, _ = dy.shape
    _, k, cig, fg, cog = wk.shape
    if fg == 1:  # [b Ho Wo, C_out] x [K C, C_out]^T
        dcols = _dot(dy.reshape(z, b * ho * wo, cog), wk.reshape(z, k * cig, cog), (2, 2), call, acc)
        return dcols.reshape(z, b, ho, wo, k, cig)
    dcols = jnp.einsum("znhwfo,zkcfo->znhwkfc", dy.reshape(z, b, ho, wo, fg, cog), wk,
                       precision=call.precision, preferred_element_type=acc)
    return dcols.reshape(z, b, ho, wo, k, fg * cig)


def _dkernel_dot(cols, dy, fg: int, call, acc):
    """dwk [z, K, C/fg, fg, C_out/fg] = cols^T . dy, summed over the chunk's pixels, in acc.

    Written as the 5D contraction, not as a 2D product contracting both operands' first dim: XLA
    then lays the columns out as [K C, pixels] and runs its plain GEMM (for bfloat16 its native
    16-bit path, which the transposed-operand form leaves for a float32 conversion and a slower
    GEMM: measured 9.6 -> 3.1 ms at 4x28x28x128->128 bf16, 8.5 -> 6.5 ms fp32)."""
    z, b, ho, wo, k, c = cols.shape
    cig, cog = c // fg, dy.shape[-1] // fg
    return jnp.einsum("znhwkfc,znhwfo->zkcfo", cols.reshape(z, b, ho, wo, k, fg, cig),
                      dy.reshape(z, b, ho, wo, fg, cog), precision=call.precision,
                      preferred_element_type=acc)


def forward(x, offset, mask, kernel, call):
    """y [..., N, Ho, Wo, C_out]; mask is the (0,) placeholder (possibly broadcast) without
    modulation."""
    lead_shape = x.shape[:-4]
    lead = len(lead_shape)
    with_mask = dict(call.attrs)["with_mask"] != 0
    x, offset, kernel = _fold(x, lead), _fold(offset, lead), _fold(kernel, lead)
    mask = _fold(mask, lead) if with_mask else None
    z, n = x.shape[:2]
    k, fg, cig, cog = _shapes(x, kernel)[1:]
    acc = _ffi.accumulation_dtype(x.dtype)
    wk = kernel.reshape(z, k, cig, fg, cog)

    ho, wo = offset.shape[2:4]
    rows = call.chunk_rows
    if rows >= ho:  # chunks of whole images (always on the GPU)
        def step(start, size, y, ins):
            x, offset, mask = ins
            cols = _sample(x, offset, mask, start, (size, ho), call, with_mask)
            return _put(y, _forward_dot(cols, wk, call, acc).astype(x.dtype), start)

        y = jnp.zeros((z, n, ho, wo, fg * cog), x.dtype)
        y = _for_chunks(n, _chunk_size(n, z, rows // ho), step, y, (x, offset, mask),
                        unroll=call.platform == "cuda")
        return y.reshape(*lead_shape, *y.shape[1:])

    # Runs of rows over the batch's N * Ho (a run may cross images). The sampler counts its start
    # in units of the run's R rows: a full run (1, b) starts at run start // b, the remainder run
    # as (rem, 1) at its row.
    b = _chunk_size(n * ho, z, rows)

    def step(start, size, y, ins):  # y [z, N * Ho, Wo, C_out]
        x, offset, mask = ins
        shape, unit_start = ((1, b), start // b) if size == b else ((size, 1), start)
        cols = _sample(x, offset, mask, unit_start, shape, call, with_mask)
        y_rows = _forward_dot(cols, wk, call, acc).reshape(z, size, wo, fg * cog)
        return _put(y, y_rows.astype(x.dtype), start)

    y = jnp.zeros((z, n * ho, wo, fg * cog), x.dtype)
    y = _for_chunks(n * ho, b, step, y, (x, offset, mask), unroll=call.platform == "cuda")
    return y.reshape(*lead_shape, n, ho, wo, fg * cog)


def backward(x, offset, mask, kernel, dy, call):
    """(dx, doffset, dmask, dkernel) for cotangent dy; dmask is the placeholder without
    modulation."""
    lead_shape = x.shape[:-4]
    lead = len(lead_shape)
    with_mask = dict(call.attrs)["with_mask"] != 0
    mask_in = mask
    x, offset, kernel, dy = (_fold(a, lead) for a in (x, offset, kernel, dy))
    mask = _fold(mask, lead) if with_mask else None
    z, n = x.shape[:2]
    k, fg, cig, cog = _shapes(x, kernel)[1:]
    acc = _ffi.accumulation_dtype(x.dtype)
    wk = kernel.reshape(z, k, cig, fg, cog)
    attrs = call.attr_dict()

    ho, wo = offset.shape[2:4]
    cpu = call.platform == "cpu"
    mask_arg = (lambda m: m) if with_mask else (lambda m: _ffi.mask_placeholder(x.dtype))

    def step(start, size, carry, ins):  # images [start, start + size)
        x, offset, mask, dy = ins
        dx, doffset, dmask, dwk = carry
        dyc = _images(dy, start, size)
        cols = _sample(x, offset, mask, start, (size, ho), call, with_mask)
        dwk = dwk + _dkernel_dot(cols, dyc, fg, call, acc)
        dcols = _dcols_dot(dyc, wk, call, acc)
        dx_zero = jnp.zeros((z, size, *x.shape[2:]), acc) if cpu else None
        dxc, doc, dmc = _ffi.col2im(x, offset, mask_arg(mask), start, dcols, attrs, call.platform,
                                    dx=dx_zero)
        dx = _put(dx, dxc.astype(x.dtype), start)
        doffset = _put(doffset, doc, start)
        if with_mask:
            dmask = _put(dmask, dmc, start)
        return dx, doffset, dmask, dwk

    # CPU, an image's columns past tiling.CPU_BACKWARD_RUN_THRESHOLD_BYTES: per image, runs of
    # `run` rows (NativeCall.bwd_rows), each sampled, reduced by the dots and scattered by col2im
    # into the image's float32 dx, which the runs add to in the whole image's order.
    run = _chunk_size(ho, z, call.bwd_rows) if cpu and 0 < call.bwd_rows < ho else 0

    def image_step(image, size, carry, ins):
        x, offset, mask, dy = ins
        dx, doffset, dmask, dwk = carry
        dy_rows = dy.reshape(z, n * ho, wo, dy.shape[-1])

        def run_step(r0, rows, c, ins):  # output rows [r0, r0 + rows) of the image
            dx_img, doffset, dmask, dwk = c
            row = image * ho + r0  # in the batch's N * Ho rows; the calls count in single rows
            cols = _sample(x, offset, mask, row, (rows, 1), call, with_mask)
            dyr = lax.dynamic_slice_in_dim(dy_rows, row, rows, axis=1)[:, :, None]
            dwk = dwk + _dkernel_dot(cols, dyr, fg, call, acc)
            dcols = _dcols_dot(dyr, wk, call, acc)
            dx_img, doc, dmc = _ffi.col2im(x, offset, mask_arg(mask), row, dcols, attrs, "cpu",
                                           dx=dx_img)
            doffset = _put(doffset, doc[:, :, 0], row)
            if with_mask:
                dmask = _put(dmask, dmc[:, :, 0], row)
            return dx_img, doffset, dmask, dwk

        dx_img = jnp.zeros((z, 1, *x.shape[2:]), acc)
        dx_img, doffset, dmask, dwk = _for_chunks(ho, run, run_step, (dx_img, doffset, dmask, dwk),
                                                  ins, unroll=False)
        return _put(dx, dx_img.astype(x.dtype), image), doffset, dmask, dwk

    if run:  # doffset and dmask as rows [z, N * Ho, Wo, channels]
        carry = (jnp.zeros_like(x), jnp.zeros((z, n * ho, wo, offset.shape[-1]), offset.dtype),
                 jnp.zeros((z, n * ho, wo, mask.shape[-1]), mask.dtype) if with_mask else None,
                 jnp.zeros(wk.shape, acc))
        dx, doffset, dmask, dwk = _for_chunks(n, 1, image_step, carry, (x, offset, mask, dy),
                                              unroll=False)
        doffset = doffset.reshape(z, n, ho, wo, -1)
        dmask = dmask.reshape(z, n, ho, wo, -1) if with_mask else None
    else:
        carry = (jnp.zeros_like(x), jnp.zeros_like(offset),
                 jnp.zeros_like(mask) if with_mask else None, jnp.zeros(wk.shape, acc))
        dx, doffset, dmask, dwk = _for_chunks(n, _chunk_size(n, z, call.chunk), step, carry,
                                              (x, offset, mask, dy), unroll=not cpu)
    dx = dx.reshape(*lead_shape, *dx.shape[1:])
    doffset = doffset.reshape(*lead_shape, *doffset.shape[1:])
    dmask = (dmask.reshape(*lead_shape, *dmask.shape[1:]) if with_mask
             else jnp.zeros(mask_in.shape, mask_in.dtype))
    dkernel = dwk.reshape(*lead_shape, *kernel.shape[1:]).astype(kernel.dtype)
    return dx, doffset, dmask, dkernel

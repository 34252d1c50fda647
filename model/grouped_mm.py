"""One matmul per group of rows, for the MoE layer: rows sorted by expert, `offs` marking where each group ends.

    y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]        x: (M, K), w: (E, K, N), offs: int32 (E,), y: (M, N)

Why a custom op around `torch._grouped_mm` rather than calling it directly:
- The group sizes live on the device. A Python loop over experts needs them on the host (`counts.tolist()`): a
  host sync per MoE layer per forward, and a graph break under torch.compile. A grouped GEMM takes `offs` as a
  tensor, so nothing leaves the device and the traced graph has static shapes.
- `torch._grouped_mm` runs on CPU and CUDA in float32 and bfloat16, but its fake-tensor rule (what
  torch.compile / torch._dynamo trace with) accepts bfloat16 only, so a float32 model would not trace. Declared
  as our own op with its own shape rule, it traces at every dtype, and the real kernel runs underneath.
- Its backward is two more grouped GEMMs (below), so autograd never needs the group sizes on the host either.
Where `torch._grouped_mm` is missing (torch < 2.8), or for widths that are not a multiple of 16 bytes, the op loops
over the groups, with the one host read of `offs` that implies, hidden inside the op (so the graph stays whole).
"""

from __future__ import annotations

import torch

HAVE_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned(*matrices: torch.Tensor) -> bool:
    """The kernel wants every row of every operand to start on a 16-byte boundary: true for real model widths
    (multiples of 64), not for odd test shapes, which take the loop instead."""
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in matrices)


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


@torch.library.custom_op("minimind::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, K) rows grouped by `offs` times (E, K, N) weights -> (M, N)."""
    if HAVE_GROUPED_MM and _aligned(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for e, (start, end) in enumerate(_group_bounds(offs)):
        out[start:end] = x[start:end] @ w[e]
    return out


@grouped_mm.register_fake
def _grouped_mm_shape(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("minimind::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group, x_g^T @ grad_g: (M, K) and (M, N) -> (E, K, N); an empty group gets zeros."""
    if HAVE_GROUPED_MM and _aligned(x, grad):
        return torch._grouped_mm(x.t(), grad, offs=offs)
    out = x.new_zeros(offs.shape[0], x.shape[1], grad.shape[1])
    for e, (start, end) in enumerate(_group_bounds(offs)):
        out[e] = x[start:end].t() @ grad[start:end]
    return out


@grouped_mm_weight_grad.register_fake
def _weight_grad_shape(x, grad, offs):
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()  # an upstream sum() hands in an expanded (stride-0) gradient the kernel refuses
    grad_x = grouped_mm(grad, w.transpose(-2, -1).contiguous(), offs) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)

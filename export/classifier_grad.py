"""The classifier-gradient graph of classifier guidance: ∇x log softmax(classifier(x, t))[y].

torch.export cannot trace ``torch.autograd.grad`` (it meets the backward's saved tensors as
untraceable constants), and the TorchScript tracer refuses the same saved tensors. So the
gradient is traced in two steps: ``make_fx`` runs the export view (forward and autograd
backward) on symbolic shapes and records the joint computation as a graph of ATen operators
(batch stays symbolic), then the dynamo exporter turns that graph into ONNX like any module.

Two backward operators have no ONNX translation and no decomposition in torch: they are
written here as the forward operators they equal (the input gradient of a convolution is the
transposed convolution with the same weight; that of a non-overlapping average pool spreads
each value evenly over its window, a grouped transposed convolution with a constant kernel).
The result is checked against ``torch.autograd.grad`` by the rung-1 gate like any export.
"""
from __future__ import annotations

import torch
from torch import nn

aten = torch.ops.aten


def _output_padding(in_sizes, out_sizes, kernel, stride, padding, dilation) -> list[int]:
    """What a transposed convolution must add so that it returns the forward input's size."""
    return [int(i) - ((int(o) - 1) * s - 2 * p + d * (k - 1) + 1)
            for i, o, k, s, p, d in zip(in_sizes, out_sizes, kernel, stride, padding, dilation)]


def _convolution_backward(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """The input gradient of a (non-transposed) convolution; weights are constants here."""
    if transposed or list(output_mask) != [True, False, False]:
        raise NotImplementedError("only the input gradient of a plain convolution is traced")
    extra = _output_padding(x.shape[2:], grad_out.shape[2:], weight.shape[2:], stride, padding, dilation)
    grad_in = aten.convolution(grad_out, weight, None, stride, padding, dilation, True, extra, groups)
    return grad_in, None, None


def _avg_pool2d_backward(grad_out, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor):
    """The input gradient of an unpadded average pool (guided-diffusion's 2x2 Downsample)."""
    kernel = list(kernel) * (2 // len(kernel))
    stride = list(stride or kernel) * (2 // len(stride or kernel))
    if any(padding) or ceil_mode:
        raise NotImplementedError("only unpadded average pools are traced")
    channels = int(x.shape[1])
    area = divisor or kernel[0] * kernel[1]
    spread = torch.full((channels, 1, *kernel), 1.0 / area, dtype=grad_out.dtype)   # (C, 1, kh, kw)
    extra = _output_padding(x.shape[2:], grad_out.shape[2:], kernel, stride, [0, 0], [1, 1])
    return aten.convolution(grad_out, spread, None, stride, [0, 0], [1, 1], True, extra, channels)


def decompositions() -> dict:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _convolution_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_backward
    return table


class TracedGrad(nn.Module):
    """The joint forward + backward graph of a gradient view, as a module the exporter takes."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.traced = graph

    def forward(self, x, t, y):
        return self.traced(x, t, y)


def trace_gradient(view: nn.Module, example: dict[str, torch.Tensor]) -> TracedGrad:
    """Record ``view(x, t, y)`` (whose forward calls torch.autograd.grad) as ATen operators."""
    from torch.fx.experimental.proxy_tensor import make_fx

    for p in view.parameters():
        p.requires_grad_(False)          # the gradient is wrt x only; weights are constants
    graph = make_fx(lambda x, t, y: view(x, t, y), decomposition_table=decompositions(),
                    tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example.values())
    return TracedGrad(graph).eval()

"""INT8 inference on CPU: matrix products with int8 weights and int8 activations, int32 sums.

Weights are quantized once, symmetrically, with one scale per output channel; activations
are quantized at every call, symmetrically, with one scale per token (row), from that
token's own largest value. The integer product (``torch._int_mm``: oneDNN's VNNI/AMX kernels
on x86) is exact, so a row's output depends on that row and the weights alone: the proteins
a protein is batched with, and padding, never enter its quantization. (What remains is fp32's
own batch rounding elsewhere, in attention over padded keys, which now and then tips a value
across an int8 rounding boundary: one int8 step at a few positions.)

Why not torch's own dynamic quantization (``torch.ao.quantization.quantize_dynamic``)? Its
quantized Linear computes one activation scale per call over the whole (batch x tokens)
tensor, so a protein's values change with its batch-mates and padding, and on x86 it
quantizes activations to 7 bits (``reduce_range``), about 2.5 times the rounding error of 8
bits. It is also deprecated in favour of torchao, which is not a dependency of this project.
Per-token scales cost a few elementwise passes; the product itself ran as fast as torch.ao's
here. ``torch._int_mm`` is checked once per process for exactness on extreme values
(:func:`int8_kernel_problem`): CPUs without VNNI can saturate int16 partial sums.

Families put the copies in place only while their forward runs (:class:`Int8Linears` swaps
``torch.nn.Linear`` modules; UniRep hands its four matrices to its layers), so training,
export and ``state_dict`` never see them, and a weight changed in place since quantization
(an optimiser step) is quantized again before it is used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

# Below this a scale is treated as zero (an all-zero row or token), avoiding 0/0.
_TINY = 1e-30


class Int8Linear(torch.nn.Module):
    """``x @ weight.T + bias`` with int8 weights (per output channel) and int8 activations (per token)."""

    weight_int8: torch.Tensor  # (in, out), column-major
    weight_scale: torch.Tensor  # (out,)
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(_TINY) / 127
        quantized = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        # (in, out) as a transposed view of (out, in): the column-major layout oneDNN reads fastest.
        self.register_buffer("weight_int8", quantized.t())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.out_features, self.in_features = weight.shape

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(_TINY).div_(127)
        # |row / scale| <= 127 by construction: no clamp needed before the cast.
        quantized = torch.div(rows, scale).round_().to(torch.int8)
        out = torch._int_mm(quantized, self.weight_int8).to(torch.float32).mul_(scale)
        if self.bias is None:
            out.mul_(self.weight_scale)
        else:
            torch.addcmul(self.bias, out, self.weight_scale, out=out)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"


def version_of(weight: torch.Tensor) -> tuple[int, int]:
    """What changes when ``weight`` does: its version counter moves with every in-place change
    (an optimiser step, a state_dict load), its id when the parameter itself is replaced."""
    return id(weight), weight._version


@functools.cache
def int8_kernel_problem() -> str | None:
    """Why this machine's int8 matrix product cannot be trusted, or None when it is exact.

    x86 CPUs without VNNI multiply int8 pairs into int16 sums that can saturate; a product
    of extreme values (every entry +-127), compared with the exact result, catches that.
    """
    k = 512
    a = torch.full((8, k), 127, dtype=torch.int8)
    a[1::2] = -127
    a[4:, ::3] = 1
    b = torch.full((k, 24), 127, dtype=torch.int8)
    b[:, 1::2] = -127
    b[::5, 16:] = -3
    try:
        got = torch._int_mm(a, b.t().contiguous().t())
    except RuntimeError as err:
        return f"torch has no int8 matrix product on this CPU ({err})"
    exact = a.long() @ b.long()
    if not torch.equal(got.long(), exact):
        worst = (got.long() - exact).abs().max().item()
        return f"this CPU's int8 matrix product is not exact (off by up to {worst} on extreme values; no VNNI?)"
    return None


class Int8Weights(Protocol):
    """A family's int8 weights: ``active()`` is the context in which its forward uses them."""

    def active(self) -> contextlib.AbstractContextManager: ...


class Int8Linears:
    """int8 copies of every ``torch.nn.Linear`` under ``roots``, put in their places only while active."""

    def __init__(self, roots: Iterable[torch.nn.Module]):
        self._slots: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
        seen: set[int] = set()
        for root in roots:
            for parent in root.modules():
                for name, child in parent.named_children():
                    if isinstance(child, torch.nn.Linear) and id(child) not in seen:
                        seen.add(id(child))
                        self._slots.append((parent, name, child))
        self._copies = [self._quantize(linear) for _, _, linear in self._slots]

    def __len__(self) -> int:
        return len(self._slots)

    @staticmethod
    def _quantize(linear: torch.nn.Linear) -> tuple[tuple[int, int], Int8Linear]:
        return version_of(linear.weight), Int8Linear.of(linear)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for index, (parent, name, linear) in enumerate(self._slots):
            version, copy = self._copies[index]
            if version != version_of(linear.weight):
                version, copy = self._copies[index] = self._quantize(linear)
            parent._modules[name] = copy
        try:
            yield
        finally:
            for parent, name, linear in self._slots:
                parent._modules[name] = linear

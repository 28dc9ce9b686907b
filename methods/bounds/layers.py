"""Bound rules, one class per layer kind: a new kind of layer is one new class here.

Every rule wraps one module for one bound computation (rules are cheap and made afresh per call, so
per-batch state such as training-mode BatchNorm statistics never leaks between calls) and answers:

* ``forward(x)``: the clean pass (B, *in) -> (B, *out); records the input shape and, for BatchNorm in
  training mode, the clean batch's statistics that the bound rules then reuse (Shi et al. 2021);
* ``propagate(interval)``: interval bound propagation of an ``Interval``, a box in whichever form the layer
  before left it, (B, *in) -> (B, *out); affine layers and a ReLU after one work on centre and radius,
  Flatten reshapes every form, and the other kinds state their rule on the box's ends as
  ``interval(lower, upper)``. ``propagate_interval(lower, upper)`` is the same for a box given by its ends;
* ``interval_spec(interval, spec)``: lower bounds of ``spec @ output`` for spec (B, S, K) when this is
  the last layer; the default bounds the output box and multiplies by the spec, a Linear layer merges the
  spec into its weight instead ("elision", spec §3.6: strictly tighter, and what every reference does);
* ``backward(lam, lower, upper)``: one step of the CROWN backward pass for a *lower* bound: given
  coefficients ``lam`` (B, S, *out) of a linear function of this layer's output, returns coefficients
  (B, S, *in) of its input and the constant (B, S) collected on the way. ``lower``/``upper`` are bounds of
  this layer's input; only ReLU needs them. Layers without a linear relaxation raise ``MethodError``.

Units: whatever the layer sees; the engine feeds pixel-space boxes to the first layer (normalisation is a
layer of the model).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodError
from methods.bounds.functional import (
    ConvGeometry,
    centred,
    channel_affine_transpose,
    interval_relu,
    relu_relaxation,
    transposed_conv2d,
)
from methods.normalize import Normalize
from methods.parallel import batch_moments

Box = tuple[torch.Tensor, torch.Tensor]


class Interval:
    """An IBP box held in the form the layer that made it left it: its ends, an affine layer's *image*
    (centre C and radius R; the ends are C ∓ R), or, after a ReLU on such an image, its centre and radius
    with a rule that derives its ends. Every other form is derived on first use by the operations the
    box-form rules use, so every value is the same, bit for bit, whichever form a layer asks for.

    Why: a ReLU right after an affine layer goes from the image to its own output's centre and radius in one
    fused step (``functional.interval_relu``), where forming the ends, their relus and the next layer's centre
    and radius take six passes over memory forward and about ten backward; the ends are then formed only
    where a rule or a caller needs them (CROWN-IBP's relaxations, the warm-up regularisers).
    """

    def __init__(self, ends: Box | None = None, image: Box | None = None, centred_form: Box | None = None,
                 derive_ends: Callable[[], Box] | None = None):
        if ends is None and image is None and (centred_form is None or derive_ends is None):
            raise ValueError("an Interval needs its ends, an affine image, or a centre and radius with a rule "
                             "for its ends")
        self._ends, self.image, self._centred, self._derive_ends = ends, image, centred_form, derive_ends

    @property
    def shape(self) -> torch.Size:
        """The shape of one end: (B, *neurons)."""
        held = self._ends or self.image or self._centred
        assert held is not None
        return held[0].shape

    def ends(self) -> Box:
        if self._ends is None:
            if self.image is not None:
                c, r = self.image
                self._ends = (c - r, c + r)
            else:
                assert self._derive_ends is not None
                self._ends = self._derive_ends()
        return self._ends

    def centred(self) -> Box:
        """(centre, radius) of the ends (for an image, of C ∓ R: not C and R themselves, which differ from them
        by rounding)."""
        if self._centred is None:
            self._centred = centred(*self.ends())
        return self._centred

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Interval":
        """The same box with ``fn`` (a reshape) applied to every form held."""
        def both(pair: Box | None) -> Box | None:
            return None if pair is None else (fn(pair[0]), fn(pair[1]))
        derive = None if self._derive_ends is None else lambda: both(self.ends())
        return Interval(both(self._ends), both(self.image), both(self._centred), derive)


class BoundLayer:
    """Rules of one layer kind; subclasses override what their kind supports."""

    kind: ClassVar[str]

    def __init__(self, module: nn.Module):
        self.module = module
        self.in_shape: torch.Size | None = None

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    @property
    def needs_clean_pass(self) -> bool:
        """True when the bound rules depend on the clean batch (training-mode BatchNorm)."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.in_shape = x.shape[1:]
        return self.module(x)

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        raise NotImplementedError

    def propagate(self, box: Interval) -> Interval:
        self.in_shape = box.shape[1:]
        return Interval(ends=self.interval(*box.ends()))

    def propagate_interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        """``propagate`` for a box given by its ends, returning ends."""
        return self.propagate(Interval(ends=(lower, upper))).ends()

    def interval_spec(self, box: Interval, spec: torch.Tensor) -> torch.Tensor:
        out_lower, out_upper = self.propagate(box).ends()
        return _spec_lower(spec, out_lower.flatten(1), out_upper.flatten(1))

    def backward(
        self, lam: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise MethodError(
            f"{type(self.module).__name__} has interval bounds only; CROWN and CROWN-IBP need a linear "
            "relaxation of every layer (use the 'ibp' bound for this model)"
        )


def _spec_lower(spec: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """min over the box [lower, upper] (B, K) of spec (B, S, K) @ z: centre term minus radius term."""
    centre = torch.einsum("bsk,bk->bs", spec, (upper + lower) / 2)
    radius = torch.einsum("bsk,bk->bs", spec.abs(), (upper - lower) / 2)
    return centre - radius


class Affine(BoundLayer):
    """A layer z -> A z + b: IBP by centre and radius, CROWN by the transposed map."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x + b."""
        raise NotImplementedError

    def apply_abs(self, r: torch.Tensor) -> torch.Tensor:
        """|A| r (no bias): the radius of the image of a box with radius r."""
        raise NotImplementedError

    def transpose(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lam A, lam b) for lam (B, S, *out)."""
        raise NotImplementedError

    def image(self, centre: torch.Tensor, radius: torch.Tensor) -> Box:
        """(A c + b, |A| r): the centre and radius of the image of the box with centre c and radius r."""
        return self.apply(centre), self.apply_abs(radius)

    def propagate(self, box: Interval) -> Interval:
        self.in_shape = box.shape[1:]
        return Interval(image=self.image(*box.centred()))

    def backward(
        self, lam: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transpose(lam)


class Linear(Affine):
    """``nn.Linear`` and any module with ``effective_weight()`` and ``bias`` (the ℓ∞-dist ScaledLinear)."""

    kind = "linear"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or (
            callable(getattr(module, "effective_weight", None)) and hasattr(module, "bias")
        )

    @property
    def weight(self) -> torch.Tensor:
        if isinstance(self.module, nn.Linear):
            return self.module.weight
        return self.module.effective_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def apply_abs(self, r: torch.Tensor) -> torch.Tensor:
        return F.linear(r, self.weight.abs())

    def transpose(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offset = lam.new_zeros(lam.shape[:2]) if self.bias is None else lam @ self.bias
        return lam @ self.weight, offset

    def interval_spec(self, box: Interval, spec: torch.Tensor) -> torch.Tensor:
        self.in_shape = box.shape[1:]
        merged = torch.einsum("bsk,kh->bsh", spec, self.weight)
        bias = 0.0 if self.bias is None else spec @ self.bias
        box_centre, box_radius = box.centred()
        centre = torch.einsum("bsh,bh->bs", merged, box_centre) + bias
        radius = torch.einsum("bsh,bh->bs", merged.abs(), box_radius)
        return centre - radius


class Conv2d(Affine):
    """``nn.Conv2d`` with zero padding; the CROWN step is the transposed convolution."""

    kind = "conv2d"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def __init__(self, module: nn.Module):
        super().__init__(module)
        if module.padding_mode != "zeros":
            raise MethodError(f"Conv2d padding_mode {module.padding_mode!r} is not supported (zeros only)")
        if isinstance(module.padding, str):
            if module.padding != "valid":
                raise MethodError(f"Conv2d padding={module.padding!r} is not supported (give explicit sizes)")
            self.padding: tuple[int, ...] = (0, 0)
        else:
            self.padding = tuple(module.padding)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = self.module
        return F.conv2d(x, weight, bias, m.stride, self.padding, m.dilation, m.groups)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.module.weight, self.module.bias)

    def apply_abs(self, r: torch.Tensor) -> torch.Tensor:
        return self._conv(r, self.module.weight.abs(), None)

    def transpose(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        if self.in_shape is None:
            raise MethodError("Conv2d backward needs the input shape: run a forward or interval pass first")
        batch, specs = lam.shape[:2]
        geometry = ConvGeometry(tuple(self.in_shape), m.stride, self.padding, m.dilation, m.groups)
        back, offset = transposed_conv2d(lam.reshape(batch * specs, *lam.shape[2:]), m.weight, m.bias, geometry)
        return back.view(batch, specs, *back.shape[1:]), offset.view(batch, specs)


class ChannelAffine(Affine):
    """Per-channel scale and shift along dim 1 (normalisation, BatchNorm): z_c -> a_c z_c + d_c."""

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, d), each (C,)."""
        raise NotImplementedError

    @staticmethod
    def _per_channel(v: torch.Tensor, ndim: int, lead: int) -> torch.Tensor:
        """View a (C,) vector to broadcast over a tensor with ``lead`` leading dims, then C, then the rest."""
        return v.view(*([1] * lead), -1, *([1] * (ndim - lead - 1)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a, d = self.scale_shift()
        return x * self._per_channel(a, x.dim(), 1) + self._per_channel(d, x.dim(), 1)

    def apply_abs(self, r: torch.Tensor) -> torch.Tensor:
        a, _ = self.scale_shift()
        return r * self._per_channel(a.abs(), r.dim(), 1)

    def transpose(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, specs = lam.shape[:2]
        back, offset = channel_affine_transpose(lam.reshape(batch * specs, *lam.shape[2:]), *self.scale_shift())
        return back.view(lam.shape), offset.view(batch, specs)


class Normalization(ChannelAffine):
    """``methods.normalize.Normalize``: a = 1/std, d = −mean/std."""

    kind = "normalize"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, Normalize)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        std = self.module.std.flatten()
        return 1.0 / std, -self.module.mean.flatten() / std


class BatchNorm(ChannelAffine):
    """BatchNorm1d/2d as the per-channel affine map it applies to the clean batch.

    Eval mode: running statistics, as for inference. Training mode (or no running statistics): the clean
    batch's mean and biased variance from ``forward`` (which also updates the running statistics once, as
    the ordinary forward pass does), and the *same* affine map is applied to the bounds (Shi et al. 2021;
    auto_LiRPA's default ``bn: forward`` mode). Such bounds describe the model only together with that
    batch, which is why certification refuses training-mode models.
    """

    kind = "batchnorm"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def uses_batch_stats(self) -> bool:
        return self.module.training or self.module.running_mean is None

    @property
    def needs_clean_pass(self) -> bool:
        return self.uses_batch_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_batch_stats:
            dims = [0] + list(range(2, x.dim()))
            self._batch_stats = batch_moments(x, dims)
        return super().forward(x)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        if self.uses_batch_stats:
            if self._batch_stats is None:
                raise MethodError("training-mode BatchNorm bounds need the clean batch: run forward first")
            mean, var = self._batch_stats
        else:
            mean, var = m.running_mean, m.running_var
        a = torch.rsqrt(var + m.eps)
        if m.weight is not None:
            a = a * m.weight
        d = -mean * a
        if m.bias is not None:
            d = d + m.bias
        return a, d


class Flatten(BoundLayer):
    """``nn.Flatten`` over every non-batch dim; bounds are reshaped, coefficients reshaped back."""

    kind = "flatten"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Flatten)

    def __init__(self, module: nn.Module):
        super().__init__(module)
        if module.start_dim != 1 or module.end_dim != -1:
            raise MethodError("only nn.Flatten(start_dim=1, end_dim=-1) is supported")

    def propagate(self, box: Interval) -> Interval:
        self.in_shape = box.shape[1:]
        return box.map(lambda t: t.flatten(1))

    def backward(
        self, lam: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.in_shape is not None
        return lam.reshape(*lam.shape[:2], *self.in_shape), lam.new_zeros(lam.shape[:2])


class ReLU(BoundLayer):
    """ReLU: IBP clamps both ends; CROWN uses the triangle relaxation with the adaptive lower slope.

    For an unstable neuron (l < 0 < u) the upper line goes through (l, 0) and (u, u); the lower line is
    relu(z) ≥ a_l z with a_l = 1 if u > −l else 0 (ties -> 0): CROWN's "adaptive" choice, as in the
    CROWN-IBP and auto_LiRPA codes (spec §6.2). Stable neurons are exact.
    """

    kind = "relu"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.ReLU)

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        # relu, not clamp: the same values, and torch 1.13's clamp gradient is a slow select.
        return torch.relu(lower), torch.relu(upper)

    def propagate(self, box: Interval) -> Interval:
        if box.image is None:
            return super().propagate(box)
        self.in_shape = box.shape[1:]
        # The ends, when asked for, come from this rule on the input's ends (formed once, and shared with
        # whoever else reads them, e.g. CROWN-IBP's relaxations).
        return Interval(centred_form=interval_relu(*box.image), derive_ends=lambda: self.interval(*box.ends()))

    @staticmethod
    def relaxation(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lower slope, upper slope, upper intercept), each shaped like the box; the lower slope is
        piecewise constant in the box and carries no gradient."""
        # 0/1 masks and products instead of selects (several times faster here, same values): a safe
        # denominator (1 added where the neuron is stable) keeps the unused branch finite, so its gradient
        # is 0 rather than NaN.
        active = (lower >= 0).to(lower.dtype)
        unstable = ((lower < 0) & (upper > 0)).to(lower.dtype)
        upper_slope = unstable * (upper / (upper - lower + (1 - unstable))) + active
        upper_intercept = -upper_slope * lower * unstable
        lower_slope = (unstable * (upper > -lower).to(lower.dtype) + active).detach()
        return lower_slope, upper_slope, upper_intercept

    def backward(
        self, lam: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if lower is None or upper is None:
            raise MethodError("CROWN through a ReLU needs bounds of its input")
        batch, specs = lam.shape[:2]
        lines = (t.flatten(1) for t in self.relaxation(lower, upper))
        lam_in, offset = relu_relaxation(lam.reshape(batch, specs, -1), *lines)
        return lam_in.view(lam.shape), offset

    def backward_with_lower_slope(
        self, lam: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, slope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``backward`` with the lower line of every unstable neuron relu(z) ≥ α z set by ``slope`` α
        (B, S, N), one per margin row: α-CROWN. Sound for every α in [0, 1] (the line then lies below
        relu everywhere), which the caller keeps; differentiable in α. Stable neurons stay exact."""
        batch, specs = lam.shape[:2]
        _, upper_slope, intercept = (t.flatten(1).unsqueeze(1) for t in self.relaxation(lower, upper))
        flat_lower, flat_upper = lower.flatten(1).unsqueeze(1), upper.flatten(1).unsqueeze(1)
        unstable = ((flat_lower < 0) & (flat_upper > 0)).to(lam.dtype)
        lower_slope = unstable * slope + (flat_lower >= 0).to(lam.dtype)
        flat = lam.reshape(batch, specs, -1)
        # One of the two parts is exactly 0, so each coefficient is one rounded product, as in ``backward``.
        negative = flat.clamp(max=0)
        lam_in = flat.clamp(min=0) * lower_slope + negative * upper_slope
        return lam_in.view(lam.shape), (negative * intercept).sum(dim=2)


class Monotone(BoundLayer):
    """Element-wise non-decreasing activations (Tanh, Sigmoid): IBP maps the two ends; no CROWN rule."""

    kind = "monotone"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, (nn.Tanh, nn.Sigmoid))

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return self.module(lower), self.module(upper)


class IntervalOnly(BoundLayer):
    """A project layer (not a torch built-in) that states its own sound box rule as ``interval(l, u)``
    (the ℓ∞-dist layers). Its rule may refuse (e.g. an ℓp-dist layer at p < ∞ or in training mode)."""

    kind = "interval-only"

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return callable(getattr(module, "interval", None)) and not type(module).__module__.startswith("torch.")

    def interval(self, lower: torch.Tensor, upper: torch.Tensor) -> Box:
        return self.module.interval(lower, upper)


RULES: tuple[type[BoundLayer], ...] = (Linear, Conv2d, Normalization, BatchNorm, Flatten, ReLU, Monotone, IntervalOnly)
"""Checked in order; the first rule that accepts a module handles it."""


def bound_layer(module: nn.Module) -> BoundLayer:
    for rule in RULES:
        if rule.accepts(module):
            return rule(module)
    raise MethodError(f"no bound rule for {type(module).__name__}; supported: {', '.join(r.kind for r in RULES)}")


def bound_layers(model: nn.Module) -> list[BoundLayer]:
    """Rules for the layers of a (possibly nested) ``nn.Sequential``, in order."""
    if not isinstance(model, nn.Sequential):
        raise MethodError(f"the bound engine takes nn.Sequential models, got {type(model).__name__}")
    layers: list[BoundLayer] = []
    for module in model:
        layers.extend(bound_layers(module) if isinstance(module, nn.Sequential) else [bound_layer(module)])
    if not layers:
        raise MethodError("empty model")
    return layers

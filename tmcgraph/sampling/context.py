"""The execution context of one call: device, dtype and a private random generator.

Nothing here touches process-global state. A seed becomes a private
``torch.Generator`` that every random draw of the call uses (particles through
:func:`tmcgraph.sampling.samplers.draw_sample`, parent indices, permutations,
resampling), so two threads sharing an estimator, or two estimators of different
dtypes, get the results they would get one after another. ``dtype`` and ``device`` are
applied explicitly: data is converted when bound, and a distribution returned by a
user callable whose parameters are in another floating dtype or on another device
(``Normal(0., 1.)`` builds float32 CPU tensors) is rebuilt with converted parameters;
torch's default dtype and device are never changed.

One consequence: a distribution built only from Python numbers is created by torch in
the process's default dtype (float32 unless you changed it) before it is converted, so
with ``dtype=torch.float64`` a constant such as ``Normal(0.2, 1.1)`` carries float32
rounding (about 1e-8 relative). Every density uses the same rounded values, so
estimates stay unbiased for the model as evaluated; for float64-exact constants use
float64 tensors in the callable, or set the process default dtype yourself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import TMCGraphError
from .reflect import cast_dist
from .samplers import draw_sample

__all__ = ["Context", "resolve_device"]


def _parse_device(device, what: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise TMCGraphError(f"{what}={device!r} is not a torch device ({e})") from None


def resolve_device(device, what: str = "device") -> Optional[torch.device]:
    """``torch.device(device)``, checked to exist on this machine (``None`` stays ``None``).

    A device other than the CPU (or ``meta``) is checked by allocating an empty tensor
    on it, so an unavailable one (``"cuda"`` with a CPU-only torch, ``"cuda:3"`` on a
    one-GPU machine) is refused where it is given, not at the first tensor of a call.

    Args:
        device: A ``torch.device``, a device string or ``None``.
        what: The argument's name in the error message.

    Raises:
        TMCGraphError: If ``device`` is not a device, or is not available here.
    """
    if device is None:
        return None
    dev = _parse_device(device, what)
    if dev.type in ("cpu", "meta"):
        return dev
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        hint = ""
        if dev.type == "cuda":
            hint = (f"; torch.cuda.is_available() is {torch.cuda.is_available()}, "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s)")
        raise TMCGraphError(f"{what}={device!r} is not available on this machine ({e}){hint}") from None
    return dev


class Context:
    """Device, dtype and random generator of one call.

    Args:
        device: A ``torch.device`` for data and distribution parameters, or ``None``
            (leave tensors where they are).
        dtype: A floating dtype for data and distribution parameters, or ``None``.
        seed: An int (a private generator seeded with it, one per device used), a
            ``torch.Generator`` (used as it is, and advanced), or ``None`` (torch's
            global generator, as plain torch code would use).
        memory_limit: Largest tensor (elements) sampling may allocate for a grid density
            (the mixture couplings' ``K x K_parent`` grid is computed in chunks of
            particles under it), or ``None``.
        split: ``(plate, chunk)`` of an estimator that splits a plate: grid densities
            over that plate are computed in pieces no larger than a chunk's grid.

    Example:
        >>> import torch
        >>> from torch.distributions import Normal
        >>> a = Context(dtype=torch.float64, seed=0).sample(Normal(0., 1.), (3,))
        >>> b = Context(dtype=torch.float64, seed=0).sample(Normal(0., 1.), (3,))
        >>> a.dtype, bool((a == b).all()), torch.get_default_dtype()
        (torch.float64, True, torch.float32)
    """

    def __init__(self, device=None, dtype: Optional[torch.dtype] = None, seed=None, memory_limit=None, split=None):
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TMCGraphError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device = None if device is None else _parse_device(device, "device")
        self.dtype = dtype
        self.memory_limit = None if memory_limit is None else int(memory_limit)
        self.split = None if split is None else (str(split[0]), int(split[1]))
        self._generator = None
        self._seed = None
        if isinstance(seed, torch.Generator):
            self._generator = seed
        elif seed is not None:
            try:
                ok = not isinstance(seed, bool) and int(seed) == seed
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise TMCGraphError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
            self._seed = int(seed)
        self._generators = {}

    def generator(self, device) -> Optional[torch.Generator]:
        """The generator for draws on ``device`` (``None``: torch's global generator)."""
        if self._generator is not None or self._seed is None:
            return self._generator
        device = torch.device(device)
        key = (device.type, device.index)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self._seed)
            self._generators[key] = g
        return g

    def dist(self, d):
        """Distribution ``d`` with its parameters in this context's dtype and on its device."""
        return cast_dist(d, self.dtype, self.device)

    def sample(self, d, sample_shape) -> torch.Tensor:
        """A (reparameterised where possible) draw from ``d`` with this context's generator."""
        d = self.dist(d)
        seeded = self._generator is not None or self._seed is not None
        g = self.generator(_device_of(d)) if seeded else None
        return self.to(draw_sample(d, torch.Size(sample_shape), g))

    def randint(self, high: int, shape, device) -> torch.Tensor:
        """Uniform integers in ``[0, high)``."""
        return torch.randint(high, tuple(shape), device=device, generator=self.generator(device))

    def permutations(self, n: int, count: int, shape, device) -> torch.Tensor:
        """``[count, *shape]`` indices below ``n``: random permutations of ``range(n)``, concatenated.

        Along the first axis, each block of ``n`` consecutive entries is an independent
        uniformly random permutation (independently per position of ``shape``); the
        result is the first ``count`` entries, so every entry is marginally uniform.
        """
        blocks = max(1, math.ceil(count / n))
        u = torch.rand((blocks, n, *shape), device=device, dtype=torch.float64, generator=self.generator(device))
        return u.argsort(dim=1).reshape(blocks * n, *shape)[:count]

    def rand(self, shape, device, dtype=torch.float64) -> torch.Tensor:
        """Uniforms in ``[0, 1)``."""
        return torch.rand(tuple(shape), device=device, dtype=dtype, generator=self.generator(device))

    def to(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this context's device, floating tensors in its dtype."""
        if self.device is None and self.dtype is None:
            return t
        if self.device is not None and t.device != self.device:
            t = t.to(self.device)
        if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def __repr__(self):
        seed = self._seed if self._generator is None else self._generator
        return f"Context(device={self.device}, dtype={self.dtype}, seed={seed!r})"


def _device_of(d) -> torch.device:
    """Device of a distribution's tensors (its mean's when it has no parameter attributes)."""
    for v in vars(d).values():
        if torch.is_tensor(v):
            return v.device
        base = getattr(v, "__dict__", None)
        if isinstance(v, torch.distributions.Distribution) and base:
            return _device_of(v)
    try:
        return d.mean.device
    except (NotImplementedError, AttributeError):
        return torch.device("cpu")

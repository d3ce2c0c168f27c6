"""The one sampler registry: ``SAMPLERS[name] -> SamplerSpec``.

Adding a sampler = one file with its function plus the ``@register(...)`` line above it (and an
import in ``sampling/__init__.py``). The spec holds everything the entries ``sample`` /
``sample_time`` need: the family ("sigma": k-diffusion convention ``fn(denoiser, x, sigmas, *, key,
**options) -> x``; "time": ``fn(model, x, *, key, **options) -> x``), whether it draws noise, the
option whose Python value 0 makes it deterministic, and the NFE formula ``nfe(num_steps, **options)``
(the one place each sampler's NFE is computed; ``None`` = the sampler counts and returns ``(x, nfe)``).
Valid options and their defaults are read from the function's keyword-only parameters.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

FAMILIES = ("sigma", "time")
_REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable
    family: str
    stochastic: bool
    nfe: Callable[..., int] | None
    order: str = ""
    noise_option: str | None = None
    doc: str = ""
    options: dict = dataclasses.field(default_factory=dict)  # name -> default (_REQUIRED if none)

    def resolve(self, options: dict) -> dict:
        """``options`` completed with the defaults; unknown or missing ones raise ValueError."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"sampler {self.name!r}: unknown option(s) {unknown}; valid options: "
                             f"{sorted(self.options)}")
        out = {**{k: v for k, v in self.options.items() if v is not _REQUIRED}, **options}
        missing = sorted(set(self.options) - set(out))
        if missing:
            raise ValueError(f"sampler {self.name!r}: missing required option(s) {missing}")
        return out

    def needs_key(self, opts: dict) -> bool:
        """Stochastic, unless its noise option is the Python number 0 (a static switch)."""
        if not self.stochastic:
            return False
        if self.noise_option is None:
            return True
        v = opts[self.noise_option]
        return not (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(name: str, *, family: str, nfe, stochastic: bool = False, noise_option: str | None = None,
             order: str = ""):
    """Decorator registering ``fn`` as sampler ``name`` (its docstring's first line is the short doc)."""
    if family not in FAMILIES:
        raise ValueError(f"register({name!r}): family must be one of {FAMILIES}, got {family!r}")

    def deco(fn):
        if name in SAMPLERS:
            raise ValueError(f"register: sampler {name!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        opts = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "key"}
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        SAMPLERS[name] = SamplerSpec(name, fn, family, stochastic, nfe, order, noise_option, doc, opts)
        return fn

    return deco


def get_spec(name: str, family: str | None = None) -> SamplerSpec:
    names = sorted(n for n, s in SAMPLERS.items() if family is None or s.family == family)
    if name not in names:
        kind = f"{family}-space " if family else ""
        raise ValueError(f"unknown {kind}sampler {name!r}; expected one of {names}")
    return SAMPLERS[name]

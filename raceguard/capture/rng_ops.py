"""Which aten ops draw from (or reseed) a random generator, and from which one.

Op-schema knowledge, like :mod:`.torch_ops`' plans (which ask :func:`is_rng_op` once per
overload); :mod:`.hazards` uses :func:`rng_generator` to find the generator location a draw
touches. Its own module so that neither of those two imports the other.
"""

from __future__ import annotations

from typing import Any

import torch

# Base names of the aten ops that draw from (or reseed) a random generator. An overload with a
# ``Generator?`` argument draws from that generator, or from the default generator of the op's
# device when the argument is None; an overload without one (``aten::randn``,
# ``aten::native_dropout``) always draws from the default generator. The table is checked
# against every schema torch registers by tests/test_hazards.py.
# dropout(input, p, train) and its kinds decompose into bernoulli_ above the Python key, except
# under inference mode, where a dispatch mode sees the op itself: it draws when train and p > 0.
_DROPOUTS = (
    "aten::dropout", "aten::dropout_", "aten::feature_dropout", "aten::feature_dropout_",
    "aten::alpha_dropout", "aten::alpha_dropout_", "aten::feature_alpha_dropout", "aten::feature_alpha_dropout_",
)
RNG_OPS = frozenset(
    {
        "aten::_fused_dropout", "aten::_no_grad_normal_", "aten::_no_grad_uniform_",
        "aten::_sample_dirichlet", "aten::_standard_gamma", "aten::bernoulli", "aten::bernoulli_",
        "aten::binomial", "aten::cauchy", "aten::cauchy_", "aten::exponential", "aten::exponential_",
        "aten::geometric", "aten::geometric_", "aten::log_normal", "aten::log_normal_",
        "aten::manual_seed", "aten::multinomial", "aten::normal", "aten::normal_",
        "aten::normal_functional", "aten::poisson", "aten::rand", "aten::rand_like", "aten::randint",
        "aten::randint_like", "aten::randn", "aten::randn_like", "aten::random", "aten::random_",
        "aten::randperm", "aten::rrelu", "aten::rrelu_", "aten::rrelu_with_noise",
        "aten::rrelu_with_noise_", "aten::rrelu_with_noise_functional", "aten::seed", "aten::uniform",
        "aten::uniform_",
        # No Generator argument in any overload, but draws from the default generator.
        "aten::native_dropout",
        *_DROPOUTS,
    }
)
# Ops of RNG_OPS that take no generator argument at all.
RNG_ALWAYS_DEFAULT = frozenset({"aten::native_dropout", *_DROPOUTS})
# Ops that draw only when a boolean argument says so: base name -> (index, name) of that flag.
_RNG_CONDITION = {
    "aten::native_dropout": (2, "train"),
    **{name: (2, "train") for name in _DROPOUTS},
    "aten::rrelu": (3, "training"),
    "aten::rrelu_": (3, "training"),
    "aten::rrelu_with_noise": (4, "training"),
    "aten::rrelu_with_noise_": (4, "training"),
    "aten::rrelu_with_noise_functional": (4, "training"),
}


class _RngSpec:
    __slots__ = ("name", "gen_index", "gen_name", "gen_kwarg_only", "cond")

    def __init__(self, name: str, gen_index: int | None, gen_name: str | None, kwarg_only: bool, cond: Any) -> None:
        self.name = name
        self.gen_index = gen_index
        self.gen_name = gen_name
        self.gen_kwarg_only = kwarg_only
        self.cond = cond


_rng_specs: dict[Any, _RngSpec | None] = {}


def _build_rng_spec(func: Any) -> _RngSpec | None:
    name = func.name()
    base = name.split(".", 1)[0]
    if base not in RNG_OPS:
        return None
    gen_index = gen_name = None
    kwarg_only = False
    for i, a in enumerate(func._schema.arguments):
        if "Generator" in str(a.type):
            gen_index, gen_name, kwarg_only = i, a.name, bool(a.kwarg_only)
            break
    cond = _RNG_CONDITION.get(base)
    if cond is not None:
        # A flag left at its default is not passed to a dispatch mode: rrelu's training=False.
        default = next((a.default_value for a in func._schema.arguments if a.name == cond[1]), None)
        cond = (*cond, default)
    return _RngSpec(name, gen_index, gen_name, kwarg_only, cond)


def is_rng_op(func: Any) -> bool:
    """Whether the op overload ``func`` draws from (or reseeds) a random generator. Cached; cheap
    enough to compute once per overload in ``torch_ops.build_plan``."""
    spec = _rng_specs.get(func, False)
    if spec is False:
        spec = _rng_specs[func] = _build_rng_spec(func)
    return spec is not None


def rng_generator(func: Any, args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
    """``(location key, generator or None)`` of the generator an RNG op draws from; None when
    the op does not draw this time (dropout in eval mode). The key is ``("default", device)``
    for a device's default generator."""
    spec = _rng_specs.get(func, False)
    if spec is False:
        is_rng_op(func)
        spec = _rng_specs[func]
    if spec is None:
        return None
    if spec.cond is not None:
        index, flag, default = spec.cond
        value = args[index] if index < len(args) else kwargs.get(flag, default)
        if value is not None and not value:
            return None
        if spec.name.split(".", 1)[0] in _DROPOUTS and (_arg(args, kwargs, 1, "p") == 0 or _no_elements(args)):
            return None  # dropout with p == 0, or of nothing, returns its input without drawing
    gen = None
    if spec.gen_index is not None:
        if spec.gen_index < len(args) and not spec.gen_kwarg_only:
            gen = args[spec.gen_index]
        else:
            gen = kwargs.get(spec.gen_name)
    if gen is not None:
        return id(gen), gen
    return ("default", device_of(args, kwargs)), None


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if index < len(args) else kwargs.get(name)


def _no_elements(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].numel() == 0


def draw_conditions() -> dict[str, str | None]:
    """{base name of every RNG op: the boolean argument that must be true for it to draw, or
    None}: :func:`rng_generator`'s rule, for the native recorder's plans."""
    return {name: _RNG_CONDITION[name][1] if name in _RNG_CONDITION else None for name in RNG_OPS}


def device_of(args: tuple, kwargs: dict) -> str:
    device = kwargs.get("device")
    if device is None:
        for a in args:
            if isinstance(a, torch.Tensor):
                device = a.device
                break
    if device is None:
        return "cpu"
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        try:
            device = torch.device(device.type, getattr(torch, device.type).current_device())
        except Exception:
            pass
    return str(device)


def default_generator_name(device: str) -> str:
    if device == "cpu":
        return "torch.default_generator (cpu)"
    kind, _, index = device.partition(":")
    return f"torch.{kind}.default_generators[{index or 0}] ({device})"

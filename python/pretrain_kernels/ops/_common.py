"""Helpers shared by the op wrappers: seeds, argument checks, autograd registration."""
from __future__ import annotations

import numbers

import torch
import torch.autograd.forward_ad as _fwAD

_SEED_HIGH = 2**62
_SEED_TENSORS: dict = {}  # int seed -> (version, one-element int64 tensor), see resolve_seed


def resolve_seed(seed, generator, device: torch.device) -> torch.Tensor:
    """The op's seed as a one-element int64 tensor.

    - an int: used as is (any value in [-2**63, 2**64));
    - a tensor (one integer element, on the CPU or on the input's device): used as is (as
      int64, so an unsigned 64-bit value keeps its bits), so a seed that lives on the GPU can
      change between CUDA-graph replays;
    - None: drawn from `generator`, or from torch's default CPU generator, so that
      torch.manual_seed makes runs reproducible. A CUDA generator gives a seed on the GPU
      (no host sync).
    """
    if seed.__class__ is int and generator is None and 0 <= seed < 2**63 and not is_compiling():
        hit = _SEED_TENSORS.get(seed)  # the common case: a fixed seed passed again (see below)
        if hit is not None and hit[1]._version == hit[0]:
            return hit[1]
    if seed is not None and generator is not None:
        raise ValueError("seed and generator: pass at most one of them")
    if seed is None:
        if generator is None:
            return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu" and generator.device != device:
            raise ValueError(f"generator: expected a CPU generator or one on {device}, got one on {generator.device}")
        return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, generator=generator, device=generator.device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype == torch.bool or seed.is_complex():
            raise TypeError(f"seed: expected an integer tensor, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"seed: expected one element, got a tensor of shape {tuple(seed.shape)}")
        if seed.device.type != "cpu" and seed.device != device:
            raise ValueError(f"seed: expected a CPU tensor or one on {device}, got {seed.device}")
        return seed.reshape(1).to(torch.int64)
    if seed.__class__ is not int and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed: expected an int, a one-element integer tensor or None, got {type(seed).__name__}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: expected a value in [-2**63, 2**64), got {seed}")
    if seed >= 2**63:
        seed -= 2**64  # same 64 bits, as a signed int64
    if is_compiling():
        return torch.tensor([seed], dtype=torch.int64)
    # A fixed seed passed call after call (evaluation, benchmarks, tests) reuses its tensor; the
    # ops only read it, and one changed in place (its _version moved) is made again.
    hit = _SEED_TENSORS.get(seed)
    if hit is not None and hit[1]._version == hit[0]:
        return hit[1]
    if len(_SEED_TENSORS) >= 256:
        _SEED_TENSORS.clear()
    t = torch.tensor([seed], dtype=torch.int64)
    _SEED_TENSORS[seed] = (t._version, t)
    return t


def check_prob(name: str, value, *, low_open: bool = False) -> float:
    # exact float first: isinstance against the numbers ABCs costs more than the rest of the check
    if value.__class__ is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}: expected a probability in {interval}, got {value}")
    return v


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if value.__class__ is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name}: expected >= {low}, got {v}")
    if high is not None and v >= high:
        raise ValueError(f"{name}: expected < {high}, got {v}")
    return v


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of input_ids), got {t.device}")


def call_checked(op, args, checks):
    """op(*args) for a wrapper that leaves to the op the checks the op makes anyway (tensor
    shapes, dtypes and devices, and the values of host tensors: timesteps, sigmas, tables),
    each with a RuntimeError (a TypeError for an argument it cannot take): making them in Python
    as well would cost more than a small kernel. When the op raises, checks() runs the wrapper's
    own checks, so bad input still raises the wrapper's error naming the argument (ValueError /
    TypeError); an error they do not find propagates as the op raised it. While torch.compile
    traces, checks() runs first (shapes are known then; values are not read)."""
    if is_compiling():
        checks()
        return op(*args)
    try:
        return op(*args)
    except (RuntimeError, TypeError):
        checks()
        raise


# torch.compiler.is_compiling itself, without a wrapper frame (every op call asks); torch < 2.3: never
is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


# ---- autograd ------------------------------------------------------------------------------
#
# A differentiable op gets its derivative from a torch.autograd.Function written in the
# functorch style (forward without ctx, then setup_context), so that torch.func.grad, vjp,
# jacrev and vmap over them work; torch.library.register_autograd builds a Function that
# functorch refuses. The public wrapper calls the Function itself when it has arguments the op
# does not take (attention's `deterministic`); a direct op call reaches it through the Autograd
# kernel that register_autograd_function installs. Such a Function must also:
# - raise from jvp (forward mode, torch.func.jvp / torch.autograd.forward_ad, is not
#   implemented): without a jvp the op would run below autograd and its outputs would carry no
#   tangent, which forward mode reads as zeros. apply_function adds that jvp, naming the
#   Function's forward_mode_name;
# - call its backward op through not_differentiable, so that differentiating the gradients
#   raises: an op without a derivative would give zeros under double backward.

_AUTOGRAD_LIB = torch.library.Library("pretrain_kernels", "IMPL")


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def _needs_autograd(args) -> bool:
    if torch.is_grad_enabled():
        for a in args:  # a plain loop: any() over a generator costs a microsecond per call
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return True
    return _fwAD._current_level >= 0 and torch._C._is_fwd_grad_enabled()


def needs_autograd(*args) -> bool:
    """Whether a public wrapper must call the op through its autograd.Function: grad mode on
    with an input that requires grad, or a forward-mode level open (the Function then raises
    if an input carries a tangent). While torch.compile traces, grad mode and requires_grad
    decide alone (Dynamo traces the Function then, and cannot trace one whose inputs need no
    gradient)."""
    if is_compiling():
        return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
    return _needs_autograd(args)


# ---- calling an op -------------------------------------------------------------------------
#
# torch._C._dispatch_call_boxed(handle, *args) runs an op through the dispatcher like the
# OpOverload's builtin, without the OpOverload's Python frame and its __torch_function__
# handling: about a microsecond less per call, which on a tiny input is a fifth of the call.
# It is taken only where that handling has nothing to do (eager, no torch function mode, no
# argument overriding __torch_function__); everything the dispatcher does (autograd, autocast,
# dispatch modes, functorch) still happens. The module-level names below are looked up once.

_Tensor = torch.Tensor
_grad_enabled = torch._C.is_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_has_torch_function = torch._C._has_torch_function  # an argument overriding it, or a torch function mode
BelowAutograd = torch._C._AutoDispatchBelowAutograd

if hasattr(torch._C, "_dispatch_call_boxed") and hasattr(torch._C, "_dispatch_find_schema_or_throw"):
    call_boxed = torch._C._dispatch_call_boxed

    def op_handle(qualname: str, overload_name: str = ""):
        """The dispatcher's handle of the op `qualname` ("ns::name"), for call_boxed."""
        return torch._C._dispatch_find_schema_or_throw(qualname, overload_name)
else:  # pragma: no cover - older torch: the overload's builtin
    def call_boxed(op, *args):
        return op(*args)

    def op_handle(qualname: str, overload_name: str = ""):
        ns, name = qualname.split("::")
        overload = getattr(getattr(getattr(torch.ops, ns), name), overload_name or "default")
        return getattr(overload, "_op", overload)

_HANDLES: dict = {}  # OpOverload -> its handle (call_below_autograd)


def raw_op(qualname: str, direct=None):
    """call(*args): the op `qualname` on positional arguments, through call_boxed where that is
    the same call (eager, and nothing among the arguments or modes overrides
    __torch_function__), else through its OpOverload (torch.compile traces that one).

    direct: an entry of pretrain_kernels._C taking the same arguments (csrc/module.cpp), tried
    first on that same eager route: it runs the CPU kernel past the dispatcher, or returns
    NotImplemented wherever the dispatcher would go elsewhere (another device, a mode)."""
    overload = _op(qualname)
    handle = op_handle(qualname)

    if direct is None:
        def call(*args):
            if is_compiling() or _has_torch_function(args):
                return overload(*args)
            return call_boxed(handle, *args)
    else:
        def call(*args):
            if is_compiling() or _has_torch_function(args):
                return overload(*args)
            r = direct(*args)
            return call_boxed(handle, *args) if r is NotImplemented else r

    call.__name__ = call.__qualname__ = qualname.split("::")[1]
    return call


def plain_call(q, k, v) -> bool:
    """Whether a call on the tensors q, k, v may go straight to the backend kernel through
    call_boxed: exact torch.Tensor inputs, no derivative to record (grad mode off or no input
    requiring grad, no forward-mode level open), no torch.func transform active, no torch
    function mode and no torch.compile tracing. The attention fast paths take it."""
    return (q.__class__ is _Tensor and k.__class__ is _Tensor and v.__class__ is _Tensor
            and not (_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and _fwAD._current_level < 0 and not _functorch_active() and not is_compiling()
            and not _torch_function_mode())


def call_below_autograd(op, *args):
    """op(*args) (op an OpOverload) for a call that needs no derivative (needs_autograd said
    so): straight to the backend kernel, past the op's Autograd kernel of
    register_autograd_function, a Python function whose boxing and checks cost more than a
    small kernel, and through call_boxed where raw_op would take it. While torch.compile
    traces or a torch.func transform is active the call takes the ordinary route (the
    transforms keep their own dispatch state)."""
    if is_compiling() or _functorch_active():
        return op(*args)
    with BelowAutograd():
        if _has_torch_function(args):
            return op(*args)
        handle = _HANDLES.get(op)
        if handle is None:
            handle = _HANDLES[op] = op_handle(op._schema.name, op._schema.overload_name)
        return call_boxed(handle, *args)


def register_autograd_function(qualname: str, function, extra_args=(), public: str = "") -> None:
    """The Autograd kernel of the op `qualname`: calls that need a derivative go through the
    autograd.Function `function` (its apply takes the op's arguments, then extra_args), the
    others straight to the backend.

    Under torch.func transforms this kernel cannot help: it runs inside the dispatcher, below
    functorch's layers, where Function.apply's functorch path has no kernel. There a direct op
    call that needs a derivative raises, sending the caller to the public function `public`,
    whose wrapper applies the Function above the layers.

    The kernel applies a subclass of `function` whose forward calls the op below autograd, so
    that the forward never comes back to this kernel (torch.compile runs the op on fake tensors
    that require grad while it traces the public wrapper's Function)."""
    op = _op(qualname)
    n_args = len(op._schema.arguments)
    defaults = [a.default_value for a in op._schema.arguments]

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args[:n_args])

    function = type(function.__name__ + "Op", (function,), {"forward": staticmethod(below_autograd)})

    def kernel(keyset, *args):
        args = (*args, *defaults[len(args):])  # trailing arguments left at their defaults may be dropped
        if _needs_autograd(args):
            if torch._C._are_functorch_transforms_active():
                raise NotImplementedError(f"{qualname}: differentiating the op itself under torch.func transforms is "
                                          f"not supported; call {public or 'its public function'}")
            return apply_function(function, *args, *extra_args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _AUTOGRAD_LIB.impl(qualname.split("::")[1], kernel, "Autograd", with_keyset=True)


def forward_mode_error(what: str) -> NotImplementedError:
    return NotImplementedError(f"{what}: forward-mode AD (torch.func.jvp, torch.func.jacfwd, "
                               f"torch.autograd.forward_ad) is not supported; use reverse mode (backward, "
                               f"torch.func.grad, vjp, jacrev)")


def apply_function(function, *args):
    """function.apply(*args) for a Function of this module's kind: eagerly, its subclass whose
    jvp raises; while torch.compile traces, the Function itself (Dynamo refuses a custom jvp,
    and forward mode does not compose with torch.compile anyway)."""
    if is_compiling():
        # Dynamo refuses a Function whose inputs repeat one tensor (self-attention called as
        # f(x, x, x)): later occurrences become views of it, and their gradients still sum into it.
        seen = set()
        args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if id(a) in seen:
                    args[i] = a.view_as(a)
                seen.add(id(a))
        return function.apply(*args)
    eager = function.__dict__.get("_eager")
    if eager is None:
        what = function.forward_mode_name

        def jvp(ctx, *tangents):
            raise forward_mode_error(what)

        eager = type(function.__name__ + "Eager", (function,), {"jvp": staticmethod(jvp)})
        function._eager = eager
    return eager.apply(*args)


def not_differentiable(qualname: str, what: str, reason: str = "double backward is not supported"):
    """For a backward op `qualname`: returns call(*args), which runs it so that differentiating
    its result raises, naming `what` (the public functions it serves): double backward, and
    forward mode through it. The error comes only when such a derivative is asked for, so a
    first derivative taken with create_graph=True (as torch.func.grad does) still works. The
    op's Autograd kernel does the same for direct calls. Call `call` from the backward of the
    forward op's Function (above functorch's layers). `reason` words the error for an op that
    has no derivative at all (a sampling op whose float outputs are not differentiable)."""
    op = _op(qualname)

    def forward(*args):
        return op(*args)

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(f"{what}: {reason} ({qualname} has no derivative)")

    name = "NotDifferentiable_" + qualname.replace("::", "_")
    fn = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "generate_vmap_rule": True, "forward_mode_name": f"{what} ({qualname})"})
    register_autograd_function(qualname, fn, public=what)

    def call(*args):
        # torch.compile: AOTAutograd traces the backward once and refuses double backward itself
        if _needs_autograd(args) and not is_compiling():
            return apply_function(fn, *args)
        return call_below_autograd(op, *args)

    return call

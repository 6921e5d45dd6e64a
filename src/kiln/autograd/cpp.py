"""A C++ operator with a C++ backward, built on first use with ``cpp_extension.load_inline``.

``kiln_ext::swish`` is Swish/SiLU written as two CPU kernels (forward and backward loops over
the elements, in ``float``/``double``/``bfloat16``) plus a C++ ``torch::autograd::Function``
that ties them together. All three are registered with the dispatcher (``TORCH_LIBRARY``):

* ``kiln_ext::swish(Tensor x) -> Tensor``: CPU kernel, and an ``Autograd`` kernel that records
  the C++ backward, so ``torch.ops.kiln_ext.swish(x).sum().backward()`` never enters Python;
* ``kiln_ext::swish_backward(Tensor grad, Tensor x) -> Tensor``: CPU kernel, first-order only
  (it has no autograd formula of its own, so double backward through the op is not supported).

Python adds fake kernels for both (``torch.library.register_fake``) so the op can be traced by
``torch.compile``/``torch.export`` and passes ``torch.library.opcheck``.

The build needs a C++ compiler (``$CXX``, default ``c++``) and ninja; :func:`cpp_build_problem`
says what is missing and how to get it. It is cached per source/torch/Python version under
``$XDG_CACHE_HOME/kiln/torch_extensions/<hash>`` (``~/.cache/...`` by default), so only the first
call in a fresh cache compiles; later processes load the built library in well under a second.
Only the headers the code uses are included (no ``torch/extension.h``, no pybind11): about
18 s of compiler CPU time instead of 33 s (measured on 2 cores).

Example:
    >>> import torch
    >>> if cpp_build_problem() is None:  # doctest: +SKIP
    ...     x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    ...     torch.autograd.gradcheck(swish_cpp, (x,))
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "CPP_SOURCE",
    "cpp_build_problem",
    "default_build_directory",
    "load_swish_extension",
    "swish_cpp",
]

CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>

namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task: keeps small tensors serial

at::Tensor swish_forward_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.is_floating_point(), "kiln_ext::swish expects a floating-point tensor, got ",
              x.scalar_type());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "kiln_ext::swish", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // bfloat16 is computed in float
    const scalar_t* px = xc.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t v = static_cast<acc_t>(px[i]);
        py[i] = static_cast<scalar_t>(v / (acc_t(1) + std::exp(-v)));
      }
    });
  });
  return y;
}

at::Tensor swish_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "kiln_ext::swish_backward: grad and x shapes differ");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(),
              "kiln_ext::swish_backward: grad and x dtypes differ");
  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  at::Tensor dx = at::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xc.scalar_type(), "kiln_ext::swish_backward",
                                 [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = xc.const_data_ptr<scalar_t>();
    const scalar_t* pg = gc.const_data_ptr<scalar_t>();
    scalar_t* pd = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t v = static_cast<acc_t>(px[i]);
        const acc_t s = acc_t(1) / (acc_t(1) + std::exp(-v));
        // d/dx [x * s(x)] = s * (1 + x * (1 - s))
        const acc_t g = static_cast<acc_t>(pg[i]);
        pd[i] = static_cast<scalar_t>(g * s * (acc_t(1) + v * (acc_t(1) - s)));
      }
    });
  });
  return dx;
}

// Calls go through the dispatcher (not straight to the CPU functions) so fake/meta tensors
// and any other backend registered later take their own kernels.
at::Tensor call_swish(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_ext::swish", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor call_swish_backward(const at::Tensor& grad, const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_ext::swish_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, x);
}

class SwishFunction : public torch::autograd::Function<SwishFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});  // only the input: backward recomputes the sigmoid
    at::AutoDispatchBelowADInplaceOrView guard;  // run the kernel below the Autograd key
    return call_swish(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {call_swish_backward(grads[0], saved[0])};
  }
};

at::Tensor swish_autograd(const at::Tensor& x) { return SwishFunction::apply(x); }

}  // namespace

TORCH_LIBRARY(kiln_ext, m) {
  m.def("swish(Tensor x) -> Tensor");
  m.def("swish_backward(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_ext, CPU, m) {
  m.impl("swish", &swish_forward_cpu);
  m.impl("swish_backward", &swish_backward_cpu);
}

TORCH_LIBRARY_IMPL(kiln_ext, Autograd, m) { m.impl("swish", &swish_autograd); }
"""

_NAME = "kiln_swish_ext"
_CFLAGS = ["-O3"]
_loaded: Path | None = None


def default_build_directory() -> Path:
    """Where the extension is built and cached: one folder per source, torch and Python version.

    Returns:
        ``$XDG_CACHE_HOME/kiln/torch_extensions/<hash>`` (``~/.cache`` when unset), where
        ``<hash>`` changes whenever the C++ source, the flags, torch or Python change, so a stale
        library is never loaded.

    Example:
        >>> default_build_directory().parent.name
        'torch_extensions'
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = "\n".join([CPP_SOURCE, " ".join(_CFLAGS), torch.__version__, sys.version, sys.platform])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache / "kiln" / "torch_extensions" / digest


def _ninja_dir() -> str | None:
    """The folder holding ``ninja``: on PATH, or next to this Python (``pip install ninja``)."""
    found = shutil.which("ninja")
    if found:
        return str(Path(found).parent)
    beside = Path(sys.executable).parent
    return str(beside) if (beside / "ninja").is_file() else None


def cpp_build_problem() -> str | None:
    """Say why the C++ extension cannot be built here, or ``None`` when it can.

    Returns:
        ``None`` when a C++ compiler and ninja are found, otherwise one sentence naming what is
        missing and how to install it.

    Example:
        >>> cpp_build_problem() is None or "install" in cpp_build_problem()
        True
    """
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (
            f"no C++ compiler: {cxx!r} (from $CXX, default 'c++') is not on PATH; install g++ or "
            "clang++ (e.g. apt-get install g++) or point $CXX at one"
        )
    if _ninja_dir() is None:
        return (
            "ninja is not installed (torch.utils.cpp_extension builds with it): "
            "pip install ninja, or apt-get install ninja-build"
        )
    return None


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    # torch finds ninja through PATH only; a venv's ninja is not there unless it is activated.
    ninja_dir = _ninja_dir()
    path = os.environ.get("PATH", "")
    if ninja_dir is None or ninja_dir in path.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = os.pathsep.join([ninja_dir, path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def load_swish_extension(build_directory: str | Path | None = None, verbose: bool = False) -> Path:
    """Build (first time) and load the C++ extension; registers ``torch.ops.kiln_ext.swish``.

    Safe to call many times: after the first load in a process it returns at once.

    Args:
        build_directory: Where to build and cache; default :func:`default_build_directory`.
        verbose: Print the compiler commands.

    Returns:
        The path of the loaded shared library.

    Raises:
        RuntimeError: If no compiler or ninja is present (the message says which and how to
            install it), or if the build fails (with the compiler's output).

    Example:
        >>> path = load_swish_extension()  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'kiln_swish_ext.so'
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    problem = cpp_build_problem()
    if problem is not None:
        raise RuntimeError(f"cannot build the kiln C++ extension: {problem}")
    from torch.utils.cpp_extension import load_inline

    directory = Path(build_directory) if build_directory else default_build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with _ninja_on_path():
        library = load_inline(
            name=_NAME,
            cpp_sources=[CPP_SOURCE],
            extra_cflags=_CFLAGS,
            build_directory=str(directory),
            verbose=verbose,
            is_python_module=False,  # a TORCH_LIBRARY op library, loaded with torch.ops
            no_implicit_headers=True,  # skip torch/extension.h and pybind11: faster build
        )
    _register_fakes()
    _loaded = Path(str(library))
    return _loaded


def _register_fakes() -> None:
    @torch.library.register_fake("kiln_ext::swish")
    def _swish_fake(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("kiln_ext::swish_backward")
    def _swish_backward_fake(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x, memory_format=torch.contiguous_format)


def swish_cpp(x: torch.Tensor) -> torch.Tensor:
    """Swish/SiLU through the C++ operator, building it on first use.

    Args:
        x: A float32, float64 or bfloat16 CPU tensor.

    Returns:
        ``x * sigmoid(x)``; backward runs the C++ kernel.

    Raises:
        RuntimeError: If the extension cannot be built (see :func:`cpp_build_problem`).

    Example:
        >>> swish_cpp(torch.zeros(3))  # doctest: +SKIP
        tensor([0., 0., 0.])
    """
    load_swish_extension()
    return torch.ops.kiln_ext.swish(x)

"""Write, test and register your own autograd Function, as kiln.autograd does.

Run: python examples/custom_function.py [--cpp]

1. Write ``squareplus`` (Barron, 2021: ``(x + sqrt(x^2 + b)) / 2``, a smooth ReLU) as a
   ``torch.autograd.Function`` in the torch 2.x style: ``forward(*args)`` computes,
   ``setup_context(ctx, inputs, output)`` saves only ``x``, backward recomputes the square root.
2. Test it: ``gradcheck``/``gradgradcheck`` in float64 against finite differences, and watch
   ``gradcheck`` catch a backward with a missing factor.
3. Count what autograd keeps for backward (``kiln.autograd.saved_tensor_stats``), and run it
   under ``torch.func.vmap(torch.func.grad(...))``.
4. Register it as the operator ``example::squareplus`` with ``torch.library.custom_op``, a fake
   kernel and an autograd formula; check all three with ``torch.library.opcheck``; export it.
5. With ``--cpp``: build (or load from the cache) Kiln's C++ Swish operator and gradcheck it.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError

from kiln.autograd import cpp_build_problem, load_swish_extension, saved_tensor_stats, swish_cpp

B = 4.0  # squareplus's curvature: larger is smoother near 0


# --- 1. The Function -------------------------------------------------------------------------
class SquarePlus(torch.autograd.Function):
    generate_vmap_rule = True  # lets torch.func.vmap batch it without a hand-written rule

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return (x + torch.sqrt(x * x + B)) / 2

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])  # x only; sqrt(x^2 + b) is cheap to recompute

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (1 + x / torch.sqrt(x * x + B)) / 2


class WrongSquarePlus(SquarePlus):
    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (1 + x / torch.sqrt(x * x + B))  # forgot the / 2


def squareplus(x: torch.Tensor) -> torch.Tensor:
    return SquarePlus.apply(x)


# --- 4. The operator -------------------------------------------------------------------------
@torch.library.custom_op("example::squareplus", mutates_args=())
def squareplus_op(x: torch.Tensor) -> torch.Tensor:
    return (x + torch.sqrt(x * x + B)) / 2


@squareplus_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)  # shape/dtype/strides only: what compile and export trace with


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return grad * (1 + x / torch.sqrt(x * x + B)) / 2


squareplus_op.register_autograd(_backward, setup_context=_setup_context)


class SquarePlusOp(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squareplus_op(x)  # one node in an exported graph, not its body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpp", action="store_true", help="also build and check the C++ op")
    args = parser.parse_args()
    torch.manual_seed(0)

    # --- 2. Test: gradients in float64, where finite differences are accurate enough ---------
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(squareplus, (x,))
    torch.autograd.gradgradcheck(squareplus, (x,))
    print("gradcheck: ok, gradgradcheck: ok")
    try:
        torch.autograd.gradcheck(WrongSquarePlus.apply, (x,))
        print("wrong backward NOT caught")
    except GradcheckError:
        print("wrong backward caught by gradcheck")

    # --- 3. Memory and torch.func ------------------------------------------------------------
    big = torch.randn(10_000, requires_grad=True)
    own = saved_tensor_stats(squareplus, big)
    composite = saved_tensor_stats(lambda t: (t + torch.sqrt(t * t + B)) / 2, big)
    print(
        f"saved for backward: Function {own.count} tensor(s), {own.unique_bytes} bytes; "
        f"composite {composite.count} tensor(s), {composite.unique_bytes} bytes"
    )
    grad_fn = torch.func.grad(lambda t: squareplus(t).sum())
    per_sample = torch.func.vmap(grad_fn)(x.detach()[:, None])  # one gradient per row
    torch.testing.assert_close(per_sample[:, 0], (1 + x / torch.sqrt(x * x + B)).detach() / 2)
    print("torch.func vmap(grad): ok")

    # --- 4. The operator: opcheck tests schema, fake kernel, autograd and tracing together ----
    torch.library.opcheck(squareplus_op, (x,))
    torch.testing.assert_close(squareplus_op(x), squareplus(x))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), SquarePlusOp())
    exported = torch.export.export(model, (torch.randn(2, 3),))
    calls = [n for n in exported.graph.nodes if n.target is torch.ops.example.squareplus.default]
    print(f"opcheck: ok; exported graph calls example.squareplus {len(calls)} time(s)")

    # --- 5. Optional: the C++ operator -------------------------------------------------------
    if args.cpp:
        problem = cpp_build_problem()
        if problem is not None:
            print(f"C++ operator skipped: {problem}")
            return
        start = time.perf_counter()
        library = load_swish_extension()  # compiles on the first run, then loads from the cache
        print(f"C++ operator loaded in {time.perf_counter() - start:.1f} s from {library}")
        torch.autograd.gradcheck(swish_cpp, (x,))
        print("C++ swish gradcheck: ok")


if __name__ == "__main__":
    main()

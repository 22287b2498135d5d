"""The Triton kernels against the reference on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

Triton reads TRITON_INTERPRET when a kernel is defined, so the checks run in a child pytest with it set;
in the parent this file holds only the launcher. On a GPU the same kernels run in tests/conformance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
# Older interpreters pass integer kernel arguments as 1-element arrays, so `range(n)` fails (seen with 3.6).
pytestmark = pytest.mark.skipif(
    tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9),
    reason=f"the Triton interpreter needs triton >= 3.9, found {triton.__version__}",
)

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_kernels_under_triton_interpreter() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(proc.stdout)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert " passed" in proc.stdout and "skipped" not in proc.stdout

else:
    from mixtral.kernels import reference, triton_grouped_mm, triton_moe
    from mixtral.model.moe import route

    from conformance.test_ops import DTYPES, compare, routing

    CPU = torch.device("cpu")

    @DTYPES
    @pytest.mark.parametrize("counts", [[3, 0, 21, 0, 5], [0, 7, 0]], ids=["zeros_inside", "ends_empty"])
    def test_grouped_mm(dtype, counts) -> None:
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        inputs = [torch.randn(sum(counts), 40).to(dtype), torch.randn(len(counts), 24, 40).to(dtype)]
        compare(
            lambda x, w: triton_grouped_mm.grouped_mm(x, w.transpose(1, 2), offs),
            lambda x, w: reference.grouped_mm(x, w.transpose(1, 2), offs),
            inputs,
            CPU,
            dtype,
            "grouped_mm",
        )

    @DTYPES
    def test_permute_unpermute(dtype) -> None:
        ids, weights = routing(9, 2, (0, 2, 3))

        def moe(ops):
            def fn(x, scale, weights):
                rows, order, _ = ops.permute(x, ids, 5)
                return ops.unpermute(rows * scale, order, weights)

            return fn

        x = torch.randn(9, 33).to(dtype)
        got, want = triton_moe.permute(x, ids, 5), reference.permute(x, ids, 5)
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and got[2][[1, 4]].tolist() == [0, 0]
        inputs = [x, torch.randn(18, 33).to(dtype), weights]
        compare(moe(triton_moe), moe(reference), inputs, CPU, dtype, "permute/unpermute")

    def test_router_matches_route() -> None:
        logits = torch.randn(37, 8, requires_grad=True)
        weights, ids = triton_moe.router(logits, 2)
        want = route(logits, 2)
        assert torch.equal(ids, want.expert_ids)
        torch.testing.assert_close(weights, want.weights, rtol=1e-6, atol=1e-7)
        grad = torch.randn(37, 2)
        (got_grad,) = torch.autograd.grad(weights, logits, grad)
        (want_grad,) = torch.autograd.grad(want.weights, logits, grad)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)

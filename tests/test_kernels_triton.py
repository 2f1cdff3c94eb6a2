"""The fused Triton kernel and decoding through it, run by Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before the kernel is defined, hence one subprocess per test (tiny shapes:
the interpreter runs every program in numpy). Triton is in the dev extra, so these run on every machine.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs triton (in the dev extra: pip install -e '.[dev]')")

_GEMV = r"""
import torch, torch.nn.functional as F
from sparsescale import kernels as K, qsparse as Q
from sparsescale.kernels import gpu
assert gpu.INTERPRET and K.resolve_backend("triton", torch.device("cpu"), torch.float32) == "triton"
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for d_in, d_out in ((37, 53), (130, 70)):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(d_out, d_in, generator=g).to(dtype)
        x = (torch.round(torch.randn(d_in, generator=g) * 2) / 2).to(dtype)  # many ties at the K-th magnitude
        sw = K.SparseWeight(w, "triton")
        eye = K.SparseWeight(torch.eye(d_in, dtype=dtype), "triton")
        for k in (1, d_in // 2, d_in - 1, d_in):
            mask = Q.topk_mask(x, k)
            y, n = sw(x, k=k)
            ref = F.linear(x.double() * mask, w.double())
            assert int(n) == k, (dtype, d_in, k, int(n))
            assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, (dtype, d_in, k)
            ye, _ = eye(x, k=k)  # the kept set itself, exactly: identity weight, y = masked x
            assert torch.equal(ye, (x * mask).float()), (dtype, d_in, k)
        for kw, mask in (({"threshold": 0.7}, x.abs() > 0.7), ({"presparsified": True}, x != 0)):
            y, n = sw(x * (torch.arange(d_in) % 3 == 0) if "presparsified" in kw else x, **kw)
            if "presparsified" in kw:
                mask = (x != 0) & (torch.arange(d_in) % 3 == 0)
            assert int(n) == int(mask.sum()), (dtype, kw)
            ref = F.linear(x.double() * mask, w.double())
            assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6, (dtype, kw)
print("ok")
"""

_DECODE = r"""
import sys, torch
sys.path.insert(0, "tests")
from sparsescale import kernels as K, model as M, qsparse as Q
from test_kernels import _decode_logits
cases = [("fp32", torch.float32, {}), ("bf16", torch.bfloat16, {}),
         ("ternary", torch.float32, {"weight_bits": "1.58"}),
         ("ternary+int8", torch.float32, {"weight_bits": "1.58", "act_bits": 8}),
         ("block", torch.float32, {"block": 8})]
for name, dtype, kw in cases:
    m = Q.convert(M.build("d1", 61, seed=0).to(dtype).eval(), 0.5, **kw)
    ids = torch.randint(0, 61, (1, 4), generator=torch.Generator().manual_seed(0))
    ref = _decode_logits(m, ids, 3).float()
    d = K.enable_sparse_decode(m, backend="triton")
    got = _decode_logits(m, ids, 3).float()
    assert d.backend == "triton" and d.stats()["calls"] == 4 * 3, (name, d.stats())
    lo, hi = (0.48, 0.6) if kw.get("act_bits") else (0.48, 0.52)  # int8 rounds some kept inputs to 0
    assert lo < d.stats()["sparsity_measured"] < hi, (name, d.stats())
    assert torch.equal(got.argmax(-1), ref.argmax(-1)), name
    tol = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-5  # bf16: one ulp of the largest logit
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= tol, (name, err)
    print(name, "max rel err", err)
print("ok")
"""


def _interpret(code: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_triton_fused_gemv_in_interpreter():
    """Every dtype, ties at the K-th magnitude, K from 1 to D_in, threshold and presparsified selection."""
    _interpret(_GEMV)


def test_triton_decode_in_interpreter():
    """A converted model decoding through the fused kernel: fp32, bf16, ternary, ternary + int8, block N:M."""
    out = _interpret(_DECODE)
    assert out.count("max rel err") == 5

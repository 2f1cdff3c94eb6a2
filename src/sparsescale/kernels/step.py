"""A compiled decode step: each decoder layer of one token in one numba call, and a greedy `fused_generate`.

Why: at batch 1 on CPU, the sparse GEMV is only about half of a token's time through HF's modules. The rest
(~40 ms a token at 300M, measured with cProfile) is Python and small-op dispatch: 24 layers of RMSNorm,
rotary, KV-cache concatenation, attention and 168 projection calls. Here a layer is one call: RMSNorm, the
fused q/k/v top-K + sparse GEMV, rotary, the KV cache (preallocated), attention, o, gate/up, the GLU
(ReLU^2 or SiLU), down. It reads the weights where `enable_sparse_decode` put them (the groups' W^T, no
copy), so a token costs its weight reads plus a few ms (the dense LM head, the top-K selections). This is the
CPU counterpart of a graph-captured decode step (issue 17, item 5).

Features
- `FusedStep(model, max_len, threads=None, gemv="sparse")`: a model converted with plain top-K (any S; S = 0
  reads every row: the own-kernel baseline), fp32, with `enable_sparse_decode(model)` on the numba backend.
  `step(token, pos)` returns the logits (vocab,) of one position; the KV cache holds `max_len` positions.
  gemv="blas": every projection dense by BLAS in the same step (the benchmark's dense baseline).
- `fused_generate(model, input_ids, max_new_tokens, threads=None, gemv="sparse")`: greedy decoding of one
  sequence, the prompt fed through the same step (so prefill and decode share one cache); returns the ids
  like HF `generate` (prompt + new tokens).
- Anything outside that scope (block N:M, 8-bit activations, rescale, threshold mode, bf16, biases,
  rotary scaling, CUDA) is refused with the fix: use HF `generate` on the model with `enable_sparse_decode`.

Numerics: the GEMVs are the HF path's kernel; RMSNorm and attention accumulate in float64 and round once, so
they land within an ulp or two of torch's blocked fp32 sums. That matters more than it looks: top-K is
discontinuous, and with fp32 running sums (errors ~sqrt(d) ulp) a near-tie at the K-th magnitude flipped in
some layer of a random-init 300M model and its first decoded token differed (logits 0.34 apart); with float64
accumulation all 16 tokens agree. Logits agree with the model to ~1e-6 relative (tests/test_fused_step.py);
not bit for bit, unlike the HF path.
Threads: threads = 1 runs the layer on the calling thread. threads > 1 run the same (cached) layer on that many
Python threads at once (the GIL released): each computes its own block of output columns of every GEMV and of
the hidden state and waits at an atomic spin barrier after it (4 a layer; the current position's key and value
are read from the GEMV's output, so the cache write needs none); norms, rotary, attention and the GLU are
repeated by each thread on private copies. A column's sum runs in the same order for any thread count, so
threads change no bit of the result. numba's own pool cost 0.2-0.3 ms a launch, more than a 300M GEMV gains
from a second thread, and a cached function that calls a parallel one crashes when loaded back from the cache
(numba issue 8578); sched_yield is declared to LLVM, so the threaded layer is cached too.
gemv="blas" runs the serial layer with BLAS on `threads` threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from sparsescale.errors import UserError
from sparsescale.kernels import cpu
from sparsescale.layout import decoder_layers
from sparsescale.numba_threads import numba_threads

_ACTS = {"relu2": 0, "silu": 1}
GEMVS = ("sparse", "blas")

if cpu.HAVE_NUMBA:
    from numba import njit, types as nbt  # numba is present when HAVE_NUMBA (guarded import in kernels.cpu)
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    @njit(cache=True, boundscheck=False)
    def _rmsnorm(h, g, eps, out):
        """out = g * h / sqrt(mean(h^2) + eps), fp32 as HF's LlamaRMSNorm."""
        d = h.shape[0]
        s = 0.0  # float64: close to the correctly rounded mean, as torch's blocked fp32 sum is (see the docstring)
        for j in range(d):
            s += np.float64(h[j]) * np.float64(h[j])
        r = np.float32(1.0) / np.sqrt(np.float32(s / d) + np.float32(eps))
        for j in range(d):
            out[j] = g[j] * (h[j] * r)

    @njit(cache=True, boundscheck=False)
    def _gemv(w, d_out, x, k, idx, y):
        """y = W (top-K of x) for W^T flat (D_in * d_out,); k >= D_in reads every row; k < 0: dense, by BLAS."""
        if k < 0:
            y[:] = np.dot(x, w.reshape(x.shape[0], d_out))
            return x.shape[0]
        return cpu.gemv_serial(w, d_out, x, 0, k, 0.0, idx, y, 1, 1)  # one column block: this thread

    @njit(cache=True, boundscheck=False)
    def _rope(v, n, hd, cos, sin, tmp):
        """HF's rotary: v*cos + rotate_half(v)*sin for n heads of hd, in place."""
        half = hd // 2
        for h in range(n):
            b = h * hd
            for j in range(hd):
                tmp[j] = v[b + j]
            for j in range(half):
                v[b + j] = tmp[j] * cos[j] + (-tmp[j + half]) * sin[j]
            for j in range(half, hd):
                v[b + j] = tmp[j] * cos[j] + tmp[j - half] * sin[j]

    @njit(cache=True, nogil=True, boundscheck=False)
    def _attend(q, kc, vc, k_pos, v_pos, pos, n_heads, n_kv, hd, o):
        """o (n_heads * hd,) = softmax(q k^T / sqrt(hd)) v over positions 0..pos, per head (grouped k/v heads):
        positions < pos from the cache kc/vc, position pos from k_pos/v_pos (n_kv * hd); float64 sums, rounded
        once (see _rmsnorm)."""
        scale = 1.0 / np.sqrt(hd)
        per = n_heads // n_kv
        p = np.empty(pos + 1, np.float64)
        acc = np.empty(hd, np.float64)
        for hq in range(n_heads):
            g = hq // per
            m = -np.inf
            for t in range(pos + 1):
                s = 0.0
                if t < pos:
                    for j in range(hd):
                        s += np.float64(q[hq * hd + j]) * np.float64(kc[g, t, j])
                else:
                    for j in range(hd):
                        s += np.float64(q[hq * hd + j]) * np.float64(k_pos[g * hd + j])
                p[t] = s * scale
                m = max(m, p[t])
            z = 0.0
            for t in range(pos + 1):
                p[t] = np.exp(p[t] - m)
                z += p[t]
            for j in range(hd):
                acc[j] = 0.0
            for t in range(pos + 1):
                wt = p[t] / z
                if t < pos:
                    for j in range(hd):
                        acc[j] += wt * np.float64(vc[g, t, j])
                else:
                    for j in range(hd):
                        acc[j] += wt * np.float64(v_pos[g * hd + j])
            for j in range(hd):
                o[hq * hd + j] = np.float32(acc[j])

    @njit(cache=True, nogil=True, boundscheck=False)
    def _glu(gu, act, a):
        """a = act(gate) * up for gu = [gate | up]; act 0: ReLU^2, 1: SiLU."""
        f = a.shape[0]
        for j in range(f):
            g0 = gu[j]
            if act == 0:
                r = max(g0, np.float32(0.0))
                a[j] = (r * r) * gu[f + j]
            else:
                a[j] = (g0 / (np.float32(1.0) + np.exp(-g0))) * gu[f + j]

    @intrinsic
    def _atomic_add(typingctx, arr, i, v):
        """arr[i] += v atomically (int64 array), returning the old value."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
            return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], sig.args[2], nbt.int64), "seq_cst")
        return nbt.int64(arr, i, v), codegen

    @intrinsic
    def _atomic_load(typingctx, arr, i):
        """arr[i] read atomically (acquire): a spin loop cannot hoist it."""
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
            return builder.load_atomic(ptr, "acquire", 8)
        return nbt.int64(arr, i), codegen

    @intrinsic
    def _sched_yield(typingctx):
        """libc's sched_yield() (resolved from the process, so the caller stays cacheable)."""
        def codegen(context, builder, sig, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            return builder.call(fn, [])
        return nbt.int32(), codegen

    @njit(cache=True, nogil=True, boundscheck=False)
    def _barrier(sync, n_threads, gen):
        """Wait until every thread has arrived at barrier number `gen` (a counter that only grows): spin, then
        yield the core after ~20k spins (a loaded machine)."""
        _atomic_add(sync, 0, 1)
        spins = 0
        while _atomic_load(sync, 0) < n_threads * gen:
            spins += 1
            if spins > 20000:
                _sched_yield()

    @njit(cache=True, nogil=True, boundscheck=False)
    def _proj(w, d_out, x, k, idx, y, t, n_threads):
        """This thread's block of output columns of y = W (top-K of x) (one thread: all of y; k < 0: BLAS).
        Every thread selects the same rows; a column's sum runs in the same order for any thread count."""
        if n_threads == 1:
            _gemv(w, d_out, x, k, idx, y)
            return
        c0, c1 = cpu.col_block(d_out, t, n_threads)
        n = cpu.select_active(x, 0, k, 0.0, idx)
        acc = np.zeros(c1 - c0, np.float32)
        cpu.accumulate_rows(w, d_out, x, idx, 0, n, c0, c1, acc)
        y[c0:c1] = acc

    @njit(cache=True, nogil=True, boundscheck=False)
    def _wait(sync, n_threads, gen):
        """The barrier after a GEMV (nothing to wait for on one thread); returns the barrier count."""
        if n_threads == 1:
            return gen
        _barrier(sync, n_threads, gen + 1)
        return gen + 1

    @njit(cache=True, nogil=True, boundscheck=False)
    def _layer(t, n_threads, sync, gen, h, pos, eps, g_in, g_post, cos, sin, kc, vc, n_heads, n_kv, hd, act,
               idx, qkv, y, gu, w_qkv, k_qkv, w_o, k_o, w_gu, k_gu, w_dn, k_dn):
        """One decoder layer for the token at `pos`, run by thread t of n_threads at once: h (d,), qkv, y and gu
        are shared, each thread writes its column block of every GEMV and of h and waits at a barrier after
        it (4 a layer); kc/vc (n_kv, max_len, hd). Returns the barrier count so far."""
        d = h.shape[0]
        x = np.empty(d, np.float32)
        _rmsnorm(h, g_in, eps, x)
        dq, dk = n_heads * hd, n_kv * hd
        _proj(w_qkv, dq + 2 * dk, x, k_qkv, idx, qkv, t, n_threads)
        gen = _wait(sync, n_threads, gen)
        tmp = np.empty(hd, np.float32)
        q = qkv[:dq].copy()  # private: rotary in place
        kk = qkv[dq:dq + dk].copy()
        v = qkv[dq + dk:]
        _rope(q, n_heads, hd, cos, sin, tmp)
        _rope(kk, n_kv, hd, cos, sin, tmp)
        if t == 0:  # the others read only earlier positions of the cache: position pos comes from kk and v
            for g in range(n_kv):
                for j in range(hd):
                    kc[g, pos, j] = kk[g * hd + j]
                    vc[g, pos, j] = v[g * hd + j]
        o = np.empty(dq, np.float32)
        _attend(q, kc, vc, kk, v, pos, n_heads, n_kv, hd, o)
        _proj(w_o, d, o, k_o, idx, y, t, n_threads)
        c0, c1 = cpu.col_block(d, t, n_threads)  # this thread's part of h (one thread: all)
        for j in range(c0, c1):
            h[j] += y[j]
        gen = _wait(sync, n_threads, gen)
        _rmsnorm(h, g_post, eps, x)
        d_gu = w_gu.shape[0] // d
        _proj(w_gu, d_gu, x, k_gu, idx, gu, t, n_threads)
        gen = _wait(sync, n_threads, gen)
        a = np.empty(d_gu // 2, np.float32)
        _glu(gu, act, a)
        _proj(w_dn, d, a, k_dn, idx, y, t, n_threads)
        for j in range(c0, c1):
            h[j] += y[j]
        return _wait(sync, n_threads, gen)


def _group(mod, n_members: int, what: str):
    """The decode group a projection leads, checked to be fused as expected and plain top-K on numba fp32."""
    entry = mod.__dict__.get("_sparse_group")
    if entry is None:
        raise UserError("fused decoding needs enable_sparse_decode(model) first (backend numba)")
    group, slot = entry
    if slot != 0 or len(group.members) != n_members:
        raise UserError(f"fused decoding needs {what} fused into one group (same shape and settings): "
                        f"got {len(group.members)} member(s); use HF generate with enable_sparse_decode instead")
    if group.sw.backend != "numba" or group.sw.wt.dtype != torch.float32:
        raise UserError(f"fused decoding runs fp32 weights on the numba backend: got {group.sw.backend}/"
                        f"{group.sw.wt.dtype}; use HF generate with enable_sparse_decode instead")
    if not group.plain or group.mode != "topk" or group.bias is not None:
        raise UserError(f"fused decoding supports plain top-K without biases: {what} has {group.settings}, "
                        f"mode {group.mode!r}; use HF generate with enable_sparse_decode instead")
    return group


class FusedStep:
    """The compiled per-layer step of a converted, sparse-decode-enabled fp32 Llama, with its own KV cache."""

    def __init__(self, model, max_len: int, threads: int | None = None, gemv: str = "sparse"):
        if gemv not in GEMVS:
            raise UserError(f"gemv must be one of {GEMVS}: got {gemv!r}")
        if not cpu.HAVE_NUMBA:
            raise UserError("fused decoding needs numba: pip install numba")
        cfg = model.config
        if getattr(cfg, "hidden_act", None) not in _ACTS:
            raise UserError(f"fused decoding supports hidden_act {sorted(_ACTS)}: got {cfg.hidden_act!r}")
        rope = getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise UserError(f"fused decoding supports the default rotary only: got rope_scaling {rope!r}")
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise UserError("fused decoding supports models without biases")
        self.model, self.max_len, self.gemv = model, int(max_len), gemv
        self.threads = numba_threads(threads)
        # threads > 1: every thread runs every layer on its column blocks; BLAS threads itself
        self.par = self.threads > 1 and gemv == "sparse"
        self.eps = float(cfg.rms_norm_eps)
        self.act = _ACTS[cfg.hidden_act]
        self.layers = []
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            groups = (_group(attn.q_proj, 3, "q/k/v"), _group(attn.o_proj, 1, "o"),
                      _group(mlp.gate_proj, 2, "gate/up"), _group(mlp.down_proj, 1, "down"))
            args = []  # (W^T flat, K) per group; K = D_in reads every row, -1 means dense by BLAS
            for g in groups:
                args += [g.sw._flat, -1 if gemv == "blas" else g.k if g.settings.sparsity > 0 else g.sw.d_in]
            norms = (layer.input_layernorm.weight.detach().float().numpy(),
                     layer.post_attention_layernorm.weight.detach().float().numpy())
            self.layers.append((groups, norms, args))
        first = self.layers[0][0][0]
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = first.members[0].out_features // self.n_heads
        self.d = first.sw.d_in
        n_layers = len(self.layers)
        self.kc = np.zeros((n_layers, self.n_kv, self.max_len, self.hd), np.float32)
        self.vc = np.zeros_like(self.kc)
        d_in_max = max(g.sw.d_in for gs, _, _ in self.layers for g in gs)
        self.idx = [np.empty(d_in_max, np.int64) for _ in range(self.threads)]  # one selection per thread
        self.qkv = np.empty(first.sw.d_out, np.float32)  # the GEMV outputs (shared by the threads)
        self.y = np.empty(self.d, np.float32)
        self.gu = np.empty(self.layers[0][0][2].sw.d_out, np.float32)
        self.sync = np.zeros(1, np.int64)
        self.pool = ThreadPoolExecutor(self.threads - 1) if self.par else None
        inner = model.model
        with torch.no_grad():
            pos_ids = torch.arange(self.max_len).unsqueeze(0)
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos_ids)
        self.cos, self.sin = cos[0].contiguous().numpy(), sin[0].contiguous().numpy()
        self.embed = inner.embed_tokens.weight.detach()
        self.norm, self.head = inner.norm, model.lm_head

    def check(self) -> None:
        """An error if the weights moved since `enable_sparse_decode` (the kernel would read stale memory)."""
        if any(g.moved() for gs, _, _ in self.layers for g in gs) or not getattr(self.model, "_sparse_decode", None):
            raise UserError("the model changed since enable_sparse_decode (weights moved or decoding disabled): "
                            "call enable_sparse_decode(model) again, then fused_generate")

    @torch.no_grad()
    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (vocab,) of the token `token` at position `pos`; the cache keeps its keys and values."""
        if not 0 <= pos < self.max_len:
            raise UserError(f"position {pos} is outside the KV cache of {self.max_len} positions: "
                            "build the FusedStep with a larger max_len")
        h = self.embed[token].float().numpy().copy()
        if self.par:
            self.sync[0] = 0
            others = [self.pool.submit(self._layers, t, h, pos) for t in range(1, self.threads)]
            self._layers(0, h, pos)
            for f in others:
                f.result()
        else:
            self._layers(0, h, pos)
        return self.head(self.norm(torch.from_numpy(h)))

    def _layers(self, t: int, h: np.ndarray, pos: int) -> None:
        """Thread t's share of every layer (the GIL is released inside each call)."""
        gen, n = 0, self.threads if self.par else 1
        for i, (_, (g_in, g_post), args) in enumerate(self.layers):
            gen = _layer(t, n, self.sync, gen, h, pos, self.eps, g_in, g_post, self.cos[pos], self.sin[pos],
                         self.kc[i], self.vc[i], self.n_heads, self.n_kv, self.hd, self.act, self.idx[t],
                         self.qkv, self.y, self.gu, *args)


def fused_generate(model, input_ids: torch.Tensor, max_new_tokens: int, threads: int | None = None,
                   gemv: str = "sparse") -> torch.Tensor:
    """Greedy decoding of one sequence through `FusedStep`: (1, P + max_new_tokens) ids, like HF `generate`.
    gemv="blas": every projection dense through BLAS in the same step (the dense baseline of the benchmark)."""
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise UserError(f"fused_generate decodes one sequence: input_ids of shape (1, P >= 1), got {tuple(ids.shape)}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0: got {max_new_tokens}")
    decode = getattr(model, "_sparse_decode", None)
    if decode is None:
        raise UserError("fused_generate needs enable_sparse_decode(model) first (backend numba)")
    need = ids.shape[1] + max_new_tokens
    step = getattr(decode, "fused", None)
    if step is None or step.max_len < need or step.threads != numba_threads(threads) or step.gemv != gemv:
        step = decode.fused = FusedStep(model, need, threads, gemv)
    step.check()
    out = ids[0].tolist()
    with threadpool_limits(limits=step.threads, user_api="blas"):  # BLAS (gemv="blas") on as many threads
        logits = None
        for pos, tok in enumerate(out):
            logits = step.step(tok, pos)
        for _ in range(max_new_tokens):
            out.append(int(logits.argmax()))
            if len(out) < need:
                logits = step.step(out[-1], len(out) - 1)
    return torch.tensor([out], dtype=ids.dtype, device=ids.device)

"""decode.c from PyTorch: a whole engine step (decode tokens, prompt chunks, any mix of sequences)
in one C call, for models whose linear layers all run on the int4 or int8-group kernels. The runner takes it for
every step with full attention only: PyTorch's per-op dispatch costs a fifth to two thirds of a
step (a batch of decodes, one stream), and its prompt attention (SDPA) is slower than ours."""
import ctypes
import weakref
from functools import cache

import torch

from kvserve import native
from kvserve.native.lists import int_tensor

_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_REDUCE = ctypes.CFUNCTYPE(_i64, ctypes.POINTER(_f32), _i64)  # decode.c's Model.reduce
_POLICY = ctypes.CFUNCTYPE(_i64, _i64, ctypes.POINTER(_f32), _i64, ctypes.POINTER(_f32), _i64, _i64,
                           ctypes.POINTER(_i64))  # decode.c's Model.policy


class _Linear(ctypes.Structure):
    _fields_ = [("w", _ptr), ("scales", _ptr), ("bias", _ptr), ("n", _i64), ("k", _i64), ("group", _i64),
                ("block", _i64), ("int8", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("qkv", _Linear), ("o", _Linear),
                ("gate_up", _Linear), ("down", _Linear), ("num_experts", _i64), ("top_k", _i64),
                ("norm_topk", _i64), ("router", _ptr), ("experts_gate_up", ctypes.POINTER(_Linear)),
                ("experts_down", ctypes.POINTER(_Linear)), ("post_attn_norm", _ptr), ("post_mlp_norm", _ptr),
                ("q_norm", _ptr), ("k_norm", _ptr), ("local_rope", _i64), ("qk_norm_full", _i64)]


class _Model(ctypes.Structure):
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("intermediate", _i64), ("eps", _f32), ("scale", _f32), ("kv_bf16", _i64), ("slots", _i64),
                ("k_cache", _ptr), ("v_cache", _ptr), ("layers", ctypes.POINTER(_Layer)), ("final_norm", _ptr),
                ("windows", ctypes.POINTER(_i64)), ("reduce", _REDUCE), ("gelu", _i64),
                ("layer_group", ctypes.POINTER(_i64)), ("layer_slot", ctypes.POINTER(_i64)), ("softcap", _f32),
                ("rotary_dim", _i64), ("policy", _POLICY)]

# the layer layouts decode.c computes (Llama's: RMSNorm, rotate-half RoPE, SiLU-gated MLP; Gemma 2/3's)
_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "olmoe", "phi3", "mixtral", "gemma2", "gemma3")


@cache
def _kernel():
    has_avx2 = native.function("decode", "qmatmul_available", ctypes.c_int64, [])
    if has_avx2 is None or not has_avx2():
        return None
    return native.function("decode", "decode_step", ctypes.c_int64,
                           [ctypes.POINTER(_Model), _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64,
                            _ptr, _i64, _ptr, _i64])


def _layer_windows(cfg) -> list:
    """Each layer's sliding window (None: full attention), from ModelConfig.layer_windows (a list
    or a method returning one) where the config has it."""
    windows = getattr(cfg, "layer_windows", None)
    windows = windows() if callable(windows) else windows
    return list(windows) if windows else [None] * cfg.num_layers


def _moe_experts(mlp):
    """A mixture of experts' per-expert MLPs (kvserve/model/moe.py, quantized), else None."""
    return getattr(mlp, "experts", None)


def _shard(linear):
    """The projection itself of a tensor-parallel row-parallel wrapper (kvserve.distributed's
    RowParallel: `inner`, its sum being decode.c's reduce), else the linear."""
    return getattr(linear, "inner", linear)


class NativeDecoder:
    """Holds the C view of a model and its KV pool (pointers into their tensors, which it keeps)."""

    def __init__(self, model, pool, reduce=None, groups=None, policy=None):
        """reduce: a tensor-parallel rank's in-place sum over ranks (e.g. TPGroup.all_reduce), which
        decode.c calls after each layer's o and down projections (row-parallel shards).
        groups: the pool's KV groups (kvserve/kv/groups.py); None: one group of every layer.
        policy: an object whose run_rows(layer, q [T, H, D], out [T, H, D], rows) computes, in a
        global layer, the attention of the rows a step names as `policy_rows` (rows[i]: the i-th's
        row now, -1 when the last layer dropped it) into out (PolicyAttention); their K/V are in the pool."""
        assert pool.k.dtype == model.dtype and pool.k.is_contiguous(), "the cache the model writes"
        self.model, self.pool = model, pool
        self._error = None  # what reduce raised: re-raised after the C call returns
        cfg = model.config
        self._keep = []  # fp32 copies the C structs point into
        layers = (_Layer * cfg.num_layers)()
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            sandwich = hasattr(layer, "pre_feedforward_layernorm")  # Gemma: its post_attention_layernorm
            # normalizes attention's output, pre_feedforward_layernorm the MLP's input
            mlp_norm = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
            norms = self._norm(layer.input_layernorm), self._norm(mlp_norm)
            if _moe_experts(mlp) is None:
                layers[i] = _Layer(*norms, self._linear(attn.qkv_proj), self._linear(attn.o_proj),
                                   self._linear(mlp.gate_up_proj), self._linear(mlp.down_proj))
                if sandwich:
                    layers[i].post_attn_norm = self._norm(layer.post_attention_layernorm)
                    layers[i].post_mlp_norm = self._norm(layer.post_feedforward_layernorm)
            else:  # a mixture of experts: the dense MLP's linears stay zero
                gate_up = (_Linear * len(mlp.experts))(*(self._linear(e.gate_up_proj) for e in mlp.experts))
                down = (_Linear * len(mlp.experts))(*(self._linear(e.down_proj) for e in mlp.experts))
                self._keep += [gate_up, down]
                layers[i] = _Layer(*norms, self._linear(attn.qkv_proj), self._linear(attn.o_proj), _Linear(), _Linear(),
                                   len(mlp.experts), mlp.top_k, int(mlp.normalize), self._fp32(mlp.gate.weight),
                                   gate_up, down)
            if attn.qk_norm is not None:
                layers[i].q_norm, layers[i].k_norm = self._norm(attn.q_norm), self._norm(attn.k_norm)
                layers[i].qk_norm_full = int(attn.qk_norm == "full")
            layers[i].local_rope = int(attn.local_rope)
        self._layers = layers
        self._windows = (_i64 * cfg.num_layers)(*[w or 0 for w in _layer_windows(cfg)])
        self.num_groups = len(groups) if groups is not None else 1
        self._layer_group = (_i64 * cfg.num_layers)(*(groups.group_of if groups else [0] * cfg.num_layers))
        self._layer_slot = (_i64 * cfg.num_layers)(*(groups.slot_of if groups else range(cfg.num_layers)))
        width = cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
        self._struct = _Model(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                              width, cfg.rms_norm_eps, cfg.attention_scale,
                              int(pool.k.dtype == torch.bfloat16), pool.k.shape[2], pool.k.data_ptr(),
                              pool.v.data_ptr(), layers, self._norm(model.norm), self._windows,
                              self._reduce_callback(reduce) if reduce else _REDUCE(),
                              int(cfg.hidden_act == "gelu_tanh"), self._layer_group, self._layer_slot,
                              cfg.attn_softcap or 0.0, cfg.rotary_dim,
                              self._policy_callback(policy) if policy else _POLICY())
        self.policies = policy is not None
        self._ref = ctypes.byref(self._struct)

    def _guarded(self, fn):
        """fn as a C callback: what it raises cannot cross the C frames, so it is kept, the call
        returns -1, and __call__ raises it after the C step returns. The decoder is reached through
        a weak reference: ctypes' callback objects are invisible to the garbage collector, so a
        strong one would keep the decoder, and with it the model and KV pool, alive for good."""
        decoder = weakref.ref(self)

        def call(*args) -> int:
            try:
                fn(*args)
                return 0
            except BaseException as e:  # noqa: BLE001
                decoder()._error = e
                return -1
        return call

    def _reduce_callback(self, reduce):
        def run(x, n: int) -> None:
            reduce(torch.frombuffer(ctypes.cast(x, ctypes.POINTER(_f32 * n)).contents, dtype=torch.float32))
        self._callback = _REDUCE(self._guarded(run))  # kept alive as long as the struct points to it
        return self._callback

    def _policy_callback(self, policy):
        heads, dim = self.model.config.num_heads, self.model.config.head_dim

        def run(layer: int, qkv, qkv_n: int, out, T: int, n: int, rows) -> None:
            q = torch.frombuffer(ctypes.cast(qkv, ctypes.POINTER(_f32 * (T * qkv_n))).contents, dtype=torch.float32)
            o = torch.frombuffer(ctypes.cast(out, ctypes.POINTER(_f32 * (T * heads * dim))).contents,
                                 dtype=torch.float32)
            policy.run_rows(layer, q.view(T, qkv_n)[:, :heads * dim].unflatten(1, (heads, dim)),
                            o.view(T, heads, dim), rows[:n])
        self._policy = _POLICY(self._guarded(run))  # kept alive as long as the struct points to it
        return self._policy

    @staticmethod
    def supports(model) -> bool:
        """Every linear layer on the int4 or int8-group kernels, activations (and so the KV cache) float32 or
        bfloat16 on the CPU. Asked of the modules, not by type: native sits below kvserve.model."""
        if not hasattr(model, "layers"):  # e.g. the null model of `bench overhead`
            return False
        if getattr(model.config, "architecture", "llama") not in _ARCHITECTURES:
            return False
        linears = []
        for layer in model.layers:
            mlps = [layer.mlp] if hasattr(layer.mlp, "gate_up_proj") else _moe_experts(layer.mlp)
            if mlps is None:  # experts with float weights (decode.c runs quantized ones)
                return False
            linears += [layer.self_attn.qkv_proj, layer.self_attn.o_proj]
            linears += [m for mlp in mlps for m in (mlp.gate_up_proj, mlp.down_proj)]
        # a row-parallel shard (`inner`, summed over ranks by `reduce`) whose bias is added after the sum: not here
        row_parallel_bias = any(hasattr(m, "inner") and m.bias is not None for m in linears)
        return (_kernel() is not None and model.norm.weight.device.type == "cpu"
                and model.dtype in (torch.float32, torch.bfloat16) and not row_parallel_bias
                and all(getattr(_shard(m), "native_int4", False) or getattr(_shard(m), "int8_groups", False)
                        for m in linears))

    def _fp32(self, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        t = t.detach().float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _norm(self, norm) -> int:
        """An RMSNorm's fp32 weight as decode.c multiplies by it: Gemma's (offset 1) stores w for 1 + w."""
        return self._fp32(norm.weight.detach().float() + getattr(norm, "offset", 0.0))

    def _linear(self, m) -> _Linear:
        m = _shard(m)
        if getattr(m, "int8_groups", False):
            return _Linear(m.weight_q.data_ptr(), m.scales.data_ptr(), self._fp32(m.bias), m.out_features,
                           m.in_features, m.group, 0, 1)
        return _Linear(m.weight_q.data_ptr(), m.scales.data_ptr(), self._fp32(m.bias), m.out_features,
                       m.in_features, m.group, m.unpack_block)

    def __call__(self, tokens: list[int], positions: list[int], page_table: list[int],
                 page_starts: list[int], rows: list[int] | None = None,
                 rope_positions: list[int] | None = None, policy_rows: list[int] | None = None) -> torch.Tensor:
        """The final normed hidden states [len(rows), hidden] (model dtype) of the step's tokens
        `rows` (ascending; default all): token t at position positions[t] of the sequence whose pages
        start at page_table[page_starts[t]] (with KV groups: every group's tables, laid out alike one
        group after the other). Writes every token's K/V to the cache; tokens of one
        sequence come in order. rope_positions (default: positions) rotate q and k: a token placed
        at a smaller position of a shortened page table keeps its true rotation (self speculation).
        policy_rows (ascending; needs the decoder's `policy`): rows whose attention in the global
        layers the policy callback computes."""
        x = self.model.embed(int_tensor(tokens)).float().contiguous()  # Gemma's scaled embeddings too
        keep = torch.arange(len(tokens)) if rows is None else int_tensor(rows)
        out = x.new_empty(len(keep), x.shape[1])
        rope = self.model.rope
        rotated = positions if rope_positions is None else rope_positions
        rope.ensure(max(rotated) + 1)
        pos = int_tensor(positions)
        index = pos if rope_positions is None else int_tensor(rotated)
        cos, sin = rope.cos[index].contiguous(), rope.sin[index].contiguous()
        local = self.model.local_rope  # Gemma 3's sliding layers' table, where the model has one
        if local is not None:
            local.ensure(len(rope.cos))
            cos_local, sin_local = local.cos[index].contiguous(), local.sin[index].contiguous()
        else:
            cos_local, sin_local = cos, sin
        pages, starts = int_tensor(page_table, torch.int32), int_tensor(page_starts)
        assert not policy_rows or self.policies, "policy rows without a policy callback"
        by_policy = int_tensor(policy_rows or [])
        if _kernel()(self._ref, x.data_ptr(), len(tokens), cos.data_ptr(), sin.data_ptr(), cos_local.data_ptr(),
                     sin_local.data_ptr(), pages.data_ptr(),
                     starts.data_ptr(), pos.data_ptr(), self.pool.page_size, keep.data_ptr(), len(keep),
                     out.data_ptr(), len(page_table) // self.num_groups, by_policy.data_ptr(), len(by_policy)):
            error, self._error = self._error, None
            if error is not None:
                raise error
            raise MemoryError("decode_step could not allocate its buffers")
        return out.to(self.model.dtype)

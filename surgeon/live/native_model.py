"""Our own forward pass for llama-style decoders, dense or with routed experts, for probes that
only score text.

transformers' model code costs about three seconds to import on a 2-core CPU (docs/performance.md)
before a probe reads a byte. This module imports torch only. It computes what transformers' forward
computes for the families it covers, operation for operation and in the same order (RMSNorm in
float32, RoPE's frequencies and cos/sin as transformers makes them, SDPA with grouped heads as
transformers passes them on the CPU with TRANSFORMERS_SDPA_FORCE_GQA and elsewhere by default;
routed experts as transformers 5's grouped experts run them), so its logits are the same bits as
transformers' on the same weights: tests/test_native_model.py checks that, through the scorer's
tree masks, caches and kept logits, for every family.

Its parameters have transformers' names, so a Hybrid fills and hot-swaps it like transformers'
model; `native_config.py` says which configs it runs. It takes the call the probes make
(`input_ids`, an additive 4D mask or none, `position_ids`, `cache`, `use_cache`, `logits_to_keep`)
and nothing else: generation, hooks on routers and training keep transformers' classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.live.native_config import NativeConfig


@dataclass
class NativeOutput:
    logits: torch.Tensor
    cache: "NativeCache | None" = None


class _CacheLayer:
    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys, self.values = torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]


class NativeCache:
    """Keys and values per layer, grown by concatenation (transformers' DynamicCache, in the parts
    the scorer uses: `layers`, `get_seq_length`, `batch_select_indices`)."""

    def __init__(self, num_layers: int):
        self.layers = [_CacheLayer() for _ in range(num_layers)]

    def get_seq_length(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[-2]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)


class Linear(nn.Linear):
    """nn.Linear left uninitialised: every weight is read from the files next, and initialising
    135M parameters for nothing costs seconds. Its forward is nn.Linear's (probes route it, see
    probes/linear_kernels.py)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, **factory))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        # transformers' weight * (x * rsqrt(variance + eps)), its temporaries reused in place
        return (x * variance.add_(self.variance_epsilon).rsqrt_()).to(dtype).mul_(self.weight)


class Rotary(nn.Module):
    def __init__(self, cfg: NativeConfig, device=None, **_):
        super().__init__()
        # In float32 on the model's device, as transformers computes them when built on a device.
        arange = torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=device)
        inv_freq = 1.0 / (cfg.rope_theta ** (arange / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' (x * cos) + (rotate_half(x) * sin), the same roundings with fewer temporaries."""
    half = x.shape[-1] // 2
    rotated = torch.empty_like(x)
    torch.neg(x[..., half:], out=rotated[..., :half])
    rotated[..., half:] = x[..., :half]
    out = x * cos
    out += rotated.mul_(sin)
    return out


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, n, length, dim).reshape(batch, heads * n, length, dim)


class Attention(nn.Module):
    def __init__(self, cfg: NativeConfig, **factory):
        super().__init__()
        d, h, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.groups, self.scaling = d, h // kv, d ** -0.5
        bias = cfg.qkv_bias
        self.q_proj = Linear(cfg.hidden_size, h * d, bias=bias, **factory)
        self.k_proj = Linear(cfg.hidden_size, kv * d, bias=bias, **factory)
        self.v_proj = Linear(cfg.hidden_size, kv * d, bias=bias, **factory)
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.o_bias, **factory)
        if cfg.qk_norm == "whole":  # sized as transformers sizes them: the hidden size, its share per key head
            self.q_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(cfg.hidden_size // h * kv, cfg.rms_norm_eps, **factory)
        elif cfg.qk_norm == "head":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **factory)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, layer: _CacheLayer | None, ragged: "_Ragged | None" = None):
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "whole":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(shape), k.view(shape)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(shape)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # a heads axis: [rows, 1, width, dim] or [tokens, 1, dim]
        if ragged is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if ragged is not None:  # from [tokens, heads, dim] into the batch's grid [rows, heads, width, dim]
            q, k, v = (ragged.to_grid(t).transpose(1, 2) for t in (q, k, v))
        if layer is not None:
            k, v = layer.update(k, v)
        extra = {}
        if self.groups > 1:
            # As transformers passes them: grouped on the CPU (our probes set its
            # TRANSFORMERS_SDPA_FORCE_GQA there, see probes/attention.py) and wherever no mask is
            # given; repeated per query head otherwise (CUDA's fast kernels take no mask with groups).
            if x.device.type == "cpu" or mask is None:
                extra["enable_gqa"] = True
            else:
                k, v = _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.scaling,
                                             is_causal=mask is None and q.shape[2] > 1, **extra)
        out = out.transpose(1, 2).contiguous()
        if ragged is not None:
            out = ragged.take(out)
        return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, cfg: NativeConfig, inner: int | None = None, **factory):
        super().__init__()
        size, inner, bias = cfg.hidden_size, inner or cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(size, inner, bias=bias, **factory)
        self.up_proj = Linear(size, inner, bias=bias, **factory)
        self.down_proj = Linear(inner, size, bias=bias, **factory)

    def forward(self, x):
        gate = F.silu(self.gate_proj(x), inplace=True)
        gate *= self.up_proj(x)
        return self.down_proj(gate)


class Router(nn.Module):
    """Softmax over the experts in float32, the top k, renormalised where the config says so, handed
    on in float32 or in the model's dtype as the family does."""

    def __init__(self, cfg: NativeConfig, **factory):
        super().__init__()
        self.top_k, self.renormalise, self.float_weights = cfg.top_k, cfg.norm_topk_prob, cfg.float_router_weights
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, **factory))

    def forward(self, x):
        logits = F.linear(x, self.weight)
        probs = F.softmax(logits, dtype=torch.float, dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            weights /= weights.sum(dim=-1, keepdim=True)
        return (weights if self.float_weights else weights.to(logits.dtype)), chosen


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, in] (rows sorted by expert) times each expert's weight [E, out, in] transposed, as
    transformers' grouped experts compute it: torch's grouped_mm where this torch has it for the
    device, else one mm per expert's rows."""
    w = weight.transpose(-2, -1)
    x = x.to(w.dtype)
    if w.device.type == "cpu":  # torch <= 2.8 has no CPU kernel; <= 2.10 one that needs 16-byte alignment
        version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        usable = version > (2, 10) or (version > (2, 8) and w.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0)
    else:
        usable = w.device.type != "cuda" or torch.cuda.get_device_capability(w.device) >= (8, 0)
    if usable and hasattr(F, "grouped_mm"):
        return F.grouped_mm(x, w, offs=offsets)
    if usable and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w, offs=offsets)
    out = torch.zeros(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


class Experts(nn.Module):
    """Every routed expert of a layer in two tensors, as transformers 5 holds them."""

    def __init__(self, cfg: NativeConfig, **factory):
        super().__init__()
        e, size, inner = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * inner, size, **factory))
        self.down_proj = nn.Parameter(torch.empty(e, size, inner, **factory))

    def forward(self, x, weights, chosen):
        k = chosen.shape[-1]
        ids, order = torch.sort(chosen.reshape(-1))
        rows = x[order // k]
        row_weights = weights.reshape(-1)[order]
        # per-expert row counts (histc: float ids on the CPU, int ids elsewhere, as transformers)
        counts = torch.histc(ids.float() if x.device.type in ("cpu", "mps") else ids.int(),
                             bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate, up = _grouped_mm(rows, self.gate_up_proj, offsets).chunk(2, dim=-1)
        out = _grouped_mm(F.silu(gate) * up, self.down_proj, offsets)
        out = out * row_weights.unsqueeze(-1)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.shape[0], device=order.device)
        return out[back].view(x.shape[0], k, x.shape[-1]).sum(dim=1).to(x.dtype)


class SparseMoe(nn.Module):
    def __init__(self, cfg: NativeConfig, **factory):
        super().__init__()
        self.gate = Router(cfg, **factory)
        self.experts = Experts(cfg, **factory)
        if cfg.shared_expert_size:
            self.shared_expert = MLP(cfg, cfg.shared_expert_size, **factory)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False, **factory)
        self.shared = bool(cfg.shared_expert_size)

    def forward(self, x):
        flat = x.view(-1, x.shape[-1])
        weights, chosen = self.gate(flat)
        out = self.experts(flat, weights, chosen)
        if self.shared:  # transformers': routed + sigmoid(gate(x)) * shared(x)
            out = out + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: NativeConfig, index: int, **factory):
        super().__init__()
        self.self_attn = Attention(cfg, **factory)
        self.mlp = SparseMoe(cfg, **factory) if cfg.num_experts and cfg.moe_layers[index] else MLP(cfg, **factory)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)

    def forward(self, x, cos, sin, mask, layer, ragged=None):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, ragged)
        h += x  # x + h: the same sum (addition commutes bit for bit), in the attention's output
        out = self.mlp(self.post_attention_layernorm(h))
        out += h
        return out


class Body(nn.Module):
    def __init__(self, cfg: NativeConfig, **factory):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, **factory) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **factory)
        self.rotary_emb = Rotary(cfg, **factory)


class _Ragged:
    """Where a batch's tokens sit in its [rows, width] grid when some positions are padding: the
    forward runs embeddings, norms, linears and MLPs on the tokens alone, [tokens, size], and puts
    them in the grid only for attention, with zeros at the padding (which no token sees). A linear on
    the CPU gives each row the same bits whatever other rows are in the product (two rows or more;
    tested in float32, bfloat16 and float16), so the tokens' logits do not change; the scorer's
    batches of long contexts pad 5-30%."""

    def __init__(self, real: torch.Tensor):
        self.rows, self.width = real.shape
        self.index = real.reshape(-1).nonzero().squeeze(1)

    def take(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [tokens, ...]"""
        return grid.reshape(self.rows * self.width, *grid.shape[2:])[self.index]

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [rows, width, ...], padding zeros"""
        grid = x.new_zeros(self.rows * self.width, *x.shape[1:])
        grid.index_copy_(0, self.index, x)
        return grid.view(self.rows, self.width, *x.shape[1:])


def _causal_after(past: int, width: int, dtype, device) -> torch.Tensor:
    """Additive mask for `width` new tokens after `past` cached ones, each seeing what precedes it."""
    allowed = torch.arange(past + width, device=device)[None, :] <= (past + torch.arange(width, device=device))[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class NativeCausalLM(nn.Module):
    """A llama-style causal LM (dense or with routed experts) with transformers' parameter names, its
    weights allocated on `device` in `dtype` and not initialised (the caller fills them); see the
    module's docstring."""

    native = True  # what callers check before handing it a call only transformers' models take
    preloaded: frozenset = frozenset()  # parameters that are views of preloaded bytes (live/preload.py)

    def __init__(self, cfg: NativeConfig, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = cfg
        self.model = Body(cfg, **factory)
        # Routed experts run the padding too, as transformers' do: which other rows a grouped expert
        # product holds changes a row's sums (torch's CPU grouped_mm gave a row other bits when its
        # expert lost one of four rows, on one thread as on two), so skipping padding would too.
        self.skips_padding = not any(isinstance(layer.mlp, SparseMoe) for layer in self.model.layers)
        if cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta", dtype=dtype)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **factory)

    def adopt(self, tensors: dict) -> None:
        """Make each of `tensors` ({parameter name: tensor of its shape and dtype}) the parameter of
        that name, in place of the one allocated; any other name or shape is left to be filled."""
        params = dict(self.named_parameters())
        taken = set()
        for name, tensor in tensors.items():
            mine = params.get(name)
            if mine is None or mine.shape != tensor.shape or mine.dtype != tensor.dtype:
                continue
            owner, _, attr = name.rpartition(".")
            setattr(self.get_submodule(owner), attr, nn.Parameter(tensor))
            taken.add(name)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.preloaded = frozenset(taken)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: NativeCache | None = None,
                use_cache: bool = False, logits_to_keep: int | torch.Tensor = 0,
                real: torch.Tensor | None = None) -> NativeOutput:
        """transformers' call, and `real`: where the batch is padded, a bool [rows, width] of the
        positions that hold tokens, with `logits_to_keep` a bool [rows, width] within it. The caller
        promises that no token sees a padding position (padding after each row's tokens under the
        causal mask, or masked out); a model without routed experts then skips it on the CPU (`_Ragged`)."""
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError("the native forward takes an additive 4D attention mask or none")
        rows, width = input_ids.shape
        ragged = None
        # On the CPU only: that a row's linear bits do not depend on the other rows was checked for
        # oneDNN's kernels there; cuBLAS picks its algorithm by the product's size.
        if real is not None and self.skips_padding and input_ids.device.type == "cpu" and not bool(real.all()):
            if not (isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool):
                raise ValueError("a padded batch (real) keeps its logits by a bool mask")
            ragged = _Ragged(real)
        if use_cache and cache is None:
            cache = NativeCache(len(self.model.layers))
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(width, device=input_ids.device) + past)[None]
        if ragged is None:
            x = self.model.embed_tokens(input_ids)
        else:
            x = self.model.embed_tokens(ragged.take(input_ids))
            position_ids = ragged.take(position_ids.expand(rows, -1))
        mask = attention_mask
        if mask is None and past and width > 1:
            mask = _causal_after(past, width, x.dtype, x.device)
        cos, sin = self.model.rotary_emb(x, position_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None, ragged)
        x = self.model.norm(x)
        if ragged is not None:
            x = x[ragged.take(logits_to_keep)]
        elif isinstance(logits_to_keep, torch.Tensor):
            x = x[logits_to_keep] if logits_to_keep.dtype == torch.bool and logits_to_keep.dim() == 2 \
                else x[:, logits_to_keep, :]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:, :]
        return NativeOutput(self.lm_head(x), cache)

"""Expert routing analysis: which experts fire, for which text, and how much they matter.

The probe hooks each MoE layer's router module (the class transformers records router logits from:
`mlp.gate` in most families, `mlp.router` in gpt-oss, `block_sparse_moe.router` in Granite), which returns
(router_logits, top-k combine weights, top-k indices): the selection the model really makes, so
no top-k is re-derived here. Its input is the output of post_attention_layernorm, the hidden state
the router and the experts actually see, which is what the importance score recomputes experts on.

Everything is accumulated per batch as [layers, experts] counts (vectorised; the hook does a few
small tensor ops), plus a compact trace (token ids and the selected experts as int16) from which
"what does this expert do" is answered afterwards without another forward pass.

Terms, per MoE layer l and expert e, over N tokens with top-k routing:
  frequency[l, e]   share of tokens whose top-k contains e (sums to k over e; XPERT's
                    "activation frequency")
  usage[l, e]       frequency / k: the load distribution (sums to 1)
  mean_prob[l, e]   mean router probability over every token (softmax of the logits; DeepSeek-V3's
                    sigmoid scores normalised to sum to 1)
  mean_weight[l, e] mean combine weight the model applied, over the tokens routed to e
  top1[l, e]        share of tokens whose highest-weighted expert is e (Lee, Wynter and Ganti 2024, Figures 6-7)
  entropy[l]        load-balance entropy of usage, divided by log(E): 1 is perfectly balanced
  importance[l, e]  mean over the tokens routed to e of router probability x ||expert output||
                    (the router-weighted activation score expert-pruning work ranks experts by),
                    the experts recomputed on their tokens
  reap[l, e]        REAP's score: mean over the tokens routed to e of the combine weight the model
                    applied x ||expert output||, the norms read from the forward pass itself
                    (expert_outputs.py), so it costs no second pass
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from surgeon.core.plan import Assignment
from surgeon.errors import SurgeonError
from surgeon.jobs import NEVER, Meter


# ---------------------------------------------------------------- the model side
@dataclass(frozen=True)
class MoeLayer:
    layer: int  # decoder layer index in the model
    mlp: object  # the module holding the router and the experts
    gate: object  # the router


def router_class(model) -> tuple[type | None, int]:
    """The module class transformers records router logits from (`_can_record_outputs`), and which
    of its outputs the logits are, for every family that declares one: which module routes is
    transformers' own word, not a name we guess."""
    for module in model.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        cls = getattr(recorder, "target_class", None)
        if cls is not None:
            return cls, int(getattr(recorder, "index", 0) or 0)
    return None, 0


def moe_layers(model) -> list[MoeLayer]:
    """The decoder layers that route: each router module with the experts beside it, by layer.

    Dense layers (DeepSeek-V3's first_k_dense_replace, Qwen's mlp_only_layers) have no router and
    are skipped; so are routers inside attention (JetMoE's mixture of attention heads).
    Mixtral's block is `mlp` in memory even though its checkpoint says block_sparse_moe.
    """
    cls, _ = router_class(model)
    out: dict[int, MoeLayer] = {}
    places: dict[str, set[str]] = {}  # layer list -> where a router sits in its layers (e.g. mlp.gate)
    for name, module in model.named_modules():
        if cls is not None:
            if not isinstance(module, cls):
                continue
        elif not (name.endswith("mlp.gate") and hasattr(module, "top_k")):
            continue
        found = _layer_path(name)
        if found is not None and found[1] not in out:
            prefix, layer, rest = found
            out[layer] = MoeLayer(layer, model.get_submodule(name.rpartition(".")[0]), module)
            places.setdefault(prefix, set()).add(rest)
    # A layer may route with another class at the same place (DeepSeek-V4's hash-routed layers).
    for name, module in model.named_modules():
        found = _layer_path(name)
        if found is not None and found[1] not in out and found[2] in places.get(found[0], ()):
            out[found[1]] = MoeLayer(found[1], model.get_submodule(name.rpartition(".")[0]), module)
    return [out[k] for k in sorted(out)]


def _layer_path(name: str) -> tuple[str, int, str] | None:
    """(the layer list, layer index, the path inside the layer) of a router's module name; None outside
    decoder layers and inside attention (JetMoE routes attention heads too: that is not the MoE)."""
    segs = name.split(".")
    at = next((i for i in range(len(segs) - 1) if segs[i] in ("layers", "blocks") and segs[i + 1].isdigit()), None)
    if at is None or any("attn" in s or "attention" in s for s in segs):
        return None
    return ".".join(segs[:at + 1]), int(segs[at + 1]), ".".join(segs[at + 2:])


def router_probs(gate, logits):
    """The router's distribution over experts for each token, as float32 [tokens, experts]."""
    logits = logits.float()
    if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3 / GLM4-MoE score with a sigmoid
        s = logits.sigmoid()
        return s / s.sum(-1, keepdim=True)
    return logits.softmax(-1)


def expert_forward(experts, e: int, x):
    """One expert's FFN on hidden states x [n, H], from the fused live weights (gate half first)."""
    import torch.nn.functional as F

    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


# ---------------------------------------------------------------- results
@dataclass
class RoutingStats:
    """Routing of one model on one corpus. Arrays are numpy; axis 0 is `layers` (MoE layers only)."""

    layers: list[int]
    num_experts: int
    top_k: int
    tokens: int
    counts: np.ndarray  # [L, E] top-k selections
    top1_counts: np.ndarray  # [L, E]
    prob_sum: np.ndarray  # [L, E]
    weight_sum: np.ndarray  # [L, E] combine weights over the tokens routed to e
    cofire: np.ndarray  # [L, E, E] tokens selecting both i and j in layer l (diagonal = counts)
    cofire_next: np.ndarray  # [L-1, E, E] tokens selecting i in MoE layer l and j in the next one
    token_ids: np.ndarray  # [N] the trace: token ids, their document and position
    doc: np.ndarray  # [N]
    selected: np.ndarray  # [N, L, k] int16 expert indices
    importance_sum: np.ndarray | None = None  # [L, E] sum of p * ||out|| over routed tokens
    reap_sum: np.ndarray | None = None  # [L, E] sum of applied weight * ||out|| over routed tokens (reap=True)
    norm_sum: np.ndarray | None = None  # [L, E] sum of ||out|| over routed tokens (reap=True)
    probs: np.ndarray | None = None  # [N, L, E] float16 per-token router distributions (keep_probs)
    meta: dict = field(default_factory=dict)
    # sample_stride: per MoE layer, the router's input at every stride-th real token ([S, H] torch tensors
    # on the model's device, its dtype): the same tokens in every layer, on which expert merging compares
    # what the experts compute (prune/saliency.py). Kept for the caller that still holds the model.
    samples: list | None = None

    def _per(self, a):
        return a / max(self.tokens, 1)

    @property
    def frequency(self) -> np.ndarray:
        return self._per(self.counts)

    @property
    def usage(self) -> np.ndarray:
        return self.counts / np.maximum(self.counts.sum(1, keepdims=True), 1)

    @property
    def mean_prob(self) -> np.ndarray:
        return self._per(self.prob_sum)

    @property
    def mean_weight(self) -> np.ndarray:
        return self.weight_sum / np.maximum(self.counts, 1)

    @property
    def top1(self) -> np.ndarray:
        return self._per(self.top1_counts)

    @property
    def entropy(self) -> np.ndarray:
        u = self.usage
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(u > 0, u * np.log(u), 0.0).sum(1)
        return h / math.log(self.num_experts) if self.num_experts > 1 else np.zeros(len(self.layers))

    @property
    def importance(self) -> np.ndarray | None:
        if self.importance_sum is None:
            return None
        return self.importance_sum / np.maximum(self.counts, 1)

    @property
    def reap(self) -> np.ndarray | None:
        if self.reap_sum is None:
            return None
        return self.reap_sum / np.maximum(self.counts, 1)

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise SurgeonError(f"layer {layer}: not an MoE layer (MoE layers: {', '.join(map(str, self.layers))})")
        return self.layers.index(layer)

    def summary(self) -> dict:
        """Plain JSON: per layer, per expert figures (the heatmap a screen or --json shows)."""
        imp = self.importance
        out = {"tokens": self.tokens, "top_k": self.top_k, "num_experts": self.num_experts, "layers": []}
        for li, layer in enumerate(self.layers):
            row = {
                "layer": layer,
                "entropy": round(float(self.entropy[li]), 6),
                "top_expert": int(self.top1_counts[li].argmax()),
                "frequency": _r(self.frequency[li]),
                "mean_prob": _r(self.mean_prob[li]),
                "mean_weight": _r(self.mean_weight[li]),
                "top1": _r(self.top1[li]),
            }
            if imp is not None:
                row["importance"] = _r(imp[li])
            if self.reap is not None:
                row["reap"] = _r(self.reap[li])
            out["layers"].append(row)
        return out


def _r(a) -> list[float]:
    return [round(float(v), 6) for v in a]


# ---------------------------------------------------------------- the probe
class _Recorder:
    """Forward hooks on every router; accumulates one batch at a time on the model's device."""

    def __init__(self, moe: list[MoeLayer], device, *, importance: bool, keep_probs: bool, logits_at: int = 0,
                 reap: bool = False, trace: bool = True, sample_stride: int = 0, sample_limit: int = 0):
        import torch

        self.torch = torch
        self.logits_at = logits_at  # which output of the router holds its logits (transformers' recorder)
        self.derived = False
        self.batch = 0  # counts forward passes; `called` says which pass each router last ran in
        self.called = [-1] * len(moe)
        self.moe, self.device = moe, device
        self.E = self.k = None  # the router's outputs say, on the first batch
        self.importance, self.keep_probs = importance, keep_probs
        self.mask = None  # bool [B*T] of real (not padding) tokens in the current batch
        self.rows = None  # their indices: one index_select per tensor is several times cheaper than a mask
        # False: only counts, combine weights and REAP (saliency): no router distribution, top-1, co-firing
        # or token trace, which on a small model cost as much as its forward pass
        self.trace = trace
        self.sel: list[list] = [[] for _ in moe]
        self.probs: list[list] = [[] for _ in moe]
        self._prev = None
        self.last: list[tuple | None] = [None] * len(moe)  # each router's latest (indices, weights), unmasked
        self.handles = [m.gate.register_forward_hook(self._hook(li)) for li, m in enumerate(moe)]
        self.undo = []
        self.reap = reap
        self.sample_stride, self.sample_limit = sample_stride, sample_limit
        self.samples: list[list] = [[] for _ in moe]
        self.sample_rows = None  # rows of this batch's flattened tokens to keep the router input of
        self.seen = self.sampled = 0  # real tokens read so far, and how many of them were kept
        if reap:
            try:
                self._record_expert_outputs()
            except BaseException:  # no hook of a half-made recorder stays on the (maybe shared) model
                self.close()
                raise

    def _record_expert_outputs(self) -> None:
        from surgeon.features.routing.expert_outputs import record_expert_norms, unsupported_line

        for li, m in enumerate(self.moe):
            experts = getattr(m.mlp, "experts", None)
            undo = None if experts is None else record_expert_norms(
                experts, lambda idx, w, n, li=li: self._slots(li, idx, w, n), lambda li=li: self.last[li])
            if undo is None:
                self.close()
                raise SurgeonError(f"layer {m.layer}: " + (unsupported_line(experts) if experts is not None else
                                   f"{type(m.mlp).__name__} has no `experts` module whose outputs REAP reads"))
            self.undo.append(undo)

    def _slots(self, li: int, idx, weights, norms) -> None:
        """One experts call: per routed slot its expert, applied weight (None: the gate is already inside
        the output, Llama 4) and output norm; padding tokens are dropped as everywhere else."""
        if self.E is None:
            return  # the router has not run: nothing to attribute the slots to
        if self.rows is not None:
            idx, norms = idx.index_select(0, self.rows), norms.index_select(0, self.rows)
            weights = None if weights is None else weights.index_select(0, self.rows)
        score = norms if weights is None else weights.float() * norms
        self.reap_sum[li].index_add_(0, idx.flatten(), score.flatten().double())
        self.norm_sum[li].index_add_(0, idx.flatten(), norms.flatten().double())

    def _selection(self, module, output):
        """(logits [T, E], combine weights [T, k], expert indices [T, k]) of one router call. Most
        routers return exactly that. Llama 4's and JetMoE's return their logits among other things
        and choose the top k of them: there the choice is taken the same way (torch.topk on the
        same logits), and the weights are the softmax of the chosen logits (`derived` in the stats)."""
        torch = self.torch
        out = output if isinstance(output, tuple) else (output,)
        if (len(out) >= 3 and all(torch.is_tensor(t) for t in out[:3]) and out[0].dim() == 2
                and not out[2].is_floating_point()):
            return out[0], out[1], out[2]
        logits = out[self.logits_at] if self.logits_at < len(out) else None
        k = getattr(module, "top_k", None)
        if not (torch.is_tensor(logits) and logits.dim() == 2 and logits.is_floating_point() and isinstance(k, int)):
            raise SurgeonError(f"{type(module).__name__}: this router gives no per-token logits over its "
                               "experts and top-k choice, which routing analysis reads")
        self.derived = True
        top, idx = logits.topk(k, dim=-1)
        return logits, top.float().softmax(-1), idx

    def _allocate(self, num_experts: int, top_k: int) -> None:
        """Sized by the first router call: its logits have a column per expert the router scores
        (LongCat-Flash's zero-computation experts included) and its indices one per chosen expert."""
        torch = self.torch
        self.E, self.k = num_experts, top_k
        L, E = len(self.moe), num_experts
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)  # noqa: E731
        self.counts, self.top1, self.prob_sum, self.weight_sum = z(L, E), z(L, E), z(L, E), z(L, E)
        self.cofire, self.cofire_next = z(L, E, E), z(max(L - 1, 0), E, E)
        self.imp = z(L, E) if self.importance else None
        self.reap_sum, self.norm_sum = (z(L, E), z(L, E)) if self.reap else (None, None)

    def choose_samples(self, real_tokens: int) -> None:
        """Before a batch: which of its real tokens are the stride-th ones of the corpus."""
        torch = self.torch
        self.sample_rows = None
        if self.sample_stride:
            first = (-self.seen) % self.sample_stride
            picked = torch.arange(first, real_tokens, self.sample_stride, device=self.device)
            picked = picked[: max(self.sample_limit - self.sampled, 0)]
            if len(picked):
                self.sample_rows = picked if self.rows is None else self.rows.index_select(0, picked)
            self.sampled += len(picked)
        self.seen += real_tokens

    def close(self):
        for h in self.handles:
            h.remove()
        for undo in self.undo:
            undo()
        self.handles, self.undo = [], []

    def _hook(self, li: int):
        torch = self.torch

        def fn(module, args, output):
            if self.called[li] == self.batch:
                raise SurgeonError(f"layer {self.moe[li].layer}: its router runs more than once per token (a "
                                   "looped layer); routing analysis counts one choice per token and layer")
            self.called[li] = self.batch
            if self.sample_rows is not None:
                if not args or not torch.is_tensor(args[0]):
                    raise SurgeonError(f"layer {self.moe[li].layer}: its router is not called with the hidden "
                                       "states, so the experts' outputs cannot be sampled")
                x = args[0].reshape(-1, args[0].shape[-1])
                self.samples[li].append(x.index_select(0, self.sample_rows).detach().clone())
            logits, weights, idx = self._selection(module, output)
            if self.E is None:
                self._allocate(logits.shape[-1], idx.shape[-1])
            self.last[li] = (idx, weights)
            if self.rows is not None:
                weights, idx = weights.index_select(0, self.rows), idx.index_select(0, self.rows)
            weights = weights.float()
            if not self.trace:
                self.counts[li].index_add_(0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.float64,
                                                                        device=idx.device))
                self.weight_sum[li].index_add_(0, idx.flatten(), weights.flatten().double())
                return
            if self.rows is not None:
                logits = logits.index_select(0, self.rows)
            probs = router_probs(module, logits)
            # float32 counts are exact (a batch has far fewer than 2^24 tokens) and its matmuls are
            # several times faster than float64's; the running sums stay float64.
            onehot = torch.zeros(idx.shape[0], self.E, dtype=torch.float32, device=idx.device)
            onehot.scatter_(1, idx, 1.0)
            self.counts[li] += onehot.sum(0)
            self.top1[li] += torch.bincount(idx.gather(1, weights.argmax(1, keepdim=True)).flatten(),
                                            minlength=self.E).double()
            self.prob_sum[li] += probs.sum(0).double()
            self.weight_sum[li].index_add_(0, idx.flatten(), weights.flatten().double())
            self.cofire[li] += onehot.T @ onehot
            if li > 0 and self._prev is not None:
                self.cofire_next[li - 1] += self._prev.T @ onehot
            self._prev = onehot
            self.sel[li].append(idx.to(torch.int16).cpu())
            if self.keep_probs:
                self.probs[li].append(probs.half().cpu())
            if self.imp is not None:
                x = args[0].reshape(-1, args[0].shape[-1])
                if self.rows is not None:
                    x = x.index_select(0, self.rows)
                experts = self.moe[li].mlp.experts
                if not hasattr(experts, "gate_up_proj"):
                    raise SurgeonError(f"{type(experts).__name__}: the importance score needs experts held as "
                                       "gate_up_proj/down_proj; run routing without it")
                with torch.no_grad():
                    for e in torch.unique(idx).tolist():
                        rows = (idx == e).any(1).nonzero().flatten()
                        out = expert_forward(experts, e, x[rows])
                        self.imp[li, e] += (probs[rows, e] * out.float().norm(dim=-1)).sum().double()

        return fn


def encode_texts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    from surgeon.probes.scoring import encode

    out = []
    for t in texts:
        ids = encode(tokenizer, t)[:max_len]
        if ids:
            out.append(ids)
    if not out:
        raise SurgeonError("routing: the corpus has no tokens")
    return out


def probe_routing(model, tokenizer, texts: list[str], *, batch_size: int = 32, max_tokens: int | None = None,
                  importance: bool = False, keep_probs: bool = False, reap: bool = False, trace: bool = True,
                  progress=None, cancel=NEVER) -> RoutingStats:
    """Run `texts` through `model` (one forward pass each, batched, right-padded) and record routing."""
    return probe_domains(model, tokenizer, {"corpus": texts}, batch_size=batch_size, max_tokens=max_tokens,
                         importance=importance, keep_probs=keep_probs, reap=reap, trace=trace,
                         progress=progress, cancel=cancel)["corpus"]


def probe_domains(model, tokenizer, corpora: dict[str, list[str]], *, batch_size: int = 32,
                  max_tokens: int | None = None, importance: bool = False, keep_probs: bool = False,
                  reap: bool = False, trace: bool = True, progress=None, cancel=NEVER,
                  label: str = "routing", sample_tokens: int = 0) -> dict[str, RoutingStats]:
    """Each corpus through `model`, as `probe_routing`; one job: `progress` gets jobs.Steps in sequences
    over every corpus, `cancel` is checked before every batch. `trace=False` records only counts,
    combine weights and (with `reap`) REAP: top1, mean_prob, co-firing and the token trace stay empty.
    `sample_tokens`: keep the router input of about that many tokens, spread evenly over the corpora
    (RoutingStats.samples), at the cost of a copy of those rows."""
    moe = moe_layers(model)
    if not moe:
        raise SurgeonError(f"{getattr(model.config, 'model_type', type(model).__name__)}: the model has no "
                           "routed experts; routing analysis needs an MoE model")
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    seqs = {name: _sequences(tokenizer, texts, max_len, max_tokens) for name, texts in corpora.items()}
    meter = Meter(progress, sum(len(s) for s in seqs.values()), "sequences", label)
    total = sum(len(t) for s in seqs.values() for t in s)
    stride = max(1, total // sample_tokens) if sample_tokens else 0
    out, before = {}, 0
    for name, s in seqs.items():
        out[name] = _probe(model, moe, tokenizer, s, batch_size, importance, keep_probs, cancel,
                           lambda n, name=name, before=before: meter(before + n, detail=name), reap=reap,
                           trace=trace, sample=(stride, sample_tokens))
        before += len(s)
    return out


def padded_batch(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right to the longest row, and the attention mask (1 where a token is)."""
    import torch

    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for r, s in enumerate(batch):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return ids, mask


def _sequences(tokenizer, texts: list[str], max_len: int, max_tokens: int | None) -> list[list[int]]:
    seqs = encode_texts(tokenizer, texts, max_len)
    if max_tokens is None:
        return seqs
    kept, total = [], 0
    for s in seqs:
        if total >= max_tokens:
            break
        kept.append(s[: max_tokens - total])
        total += len(kept[-1])
    return kept


def _probe(model, moe: list[MoeLayer], tokenizer, seqs: list[list[int]], batch_size: int, importance: bool,
           keep_probs: bool, cancel, done, reap: bool = False, trace: bool = True,
           sample: tuple[int, int] = (0, 0)) -> RoutingStats:
    import torch

    device = next(model.parameters()).device
    if importance and not trace:
        raise SurgeonError("routing: importance needs the router distributions (trace)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    token_ids, docs = [], []
    rec = _Recorder(moe, device, importance=importance, keep_probs=keep_probs, logits_at=router_class(model)[1],
                    reap=reap, trace=trace, sample_stride=sample[0], sample_limit=sample[1])
    try:  # the hooks come off whatever happens: the model may be the app's shared live hybrid
        with torch.no_grad():
            for start in range(0, len(seqs), batch_size):
                cancel.check()
                batch = seqs[start:start + batch_size]
                ids, mask = padded_batch(batch, pad)
                for r, s in enumerate(batch):
                    token_ids.append(np.asarray(s, dtype=np.int64))
                    docs.append(np.full(len(s), start + r, dtype=np.int64))
                flat = mask.flatten().bool().to(device)
                rec.mask = None if bool(flat.all()) else flat
                rec.rows = None if rec.mask is None else flat.nonzero().squeeze(1)
                rec.choose_samples(sum(len(s) for s in batch))
                rec._prev = None
                rec.batch += 1
                model(ids.to(device), attention_mask=mask.to(device), use_cache=False)
                done(min(start + batch_size, len(seqs)))
    finally:
        rec.close()
    n = int(sum(len(t) for t in token_ids))
    if rec.E is None:
        raise SurgeonError("routing: no router ran (the corpus gave no batch)")
    cpu = lambda t: t.cpu().numpy()  # noqa: E731
    return RoutingStats(
        layers=[m.layer for m in moe], num_experts=rec.E, top_k=rec.k, tokens=n,
        counts=cpu(rec.counts), top1_counts=cpu(rec.top1), prob_sum=cpu(rec.prob_sum),
        weight_sum=cpu(rec.weight_sum), cofire=cpu(rec.cofire), cofire_next=cpu(rec.cofire_next),
        token_ids=np.concatenate(token_ids), doc=np.concatenate(docs),
        selected=(np.stack([torch.cat(s).numpy() for s in rec.sel], axis=1) if trace
                  else np.zeros((0, len(moe), rec.k), dtype=np.int16)),
        importance_sum=None if rec.imp is None else cpu(rec.imp),
        reap_sum=None if rec.reap_sum is None else cpu(rec.reap_sum),
        norm_sum=None if rec.norm_sum is None else cpu(rec.norm_sum),
        probs=np.stack([torch.cat(p).numpy() for p in rec.probs], axis=1) if keep_probs else None,
        # The router returned logits only: its top-k choice was taken again from them, and the combine
        # weights are the softmax of the chosen logits, not necessarily what the model applied.
        meta={"weights_derived_from_logits": True} if rec.derived else {},
        samples=[torch.cat(x) if x else None for x in rec.samples] if sample[0] else None,
    )


# ---------------------------------------------------------------- common experts (XPERT)
def top_fraction(freq_row: np.ndarray, q: float) -> set[int]:
    """The top q (0-1] share of experts by frequency: ceil(q * E) of them, ties broken by index."""
    if not 0 < q <= 1:
        raise SurgeonError(f"q must be in (0, 1], got {q}")
    n = max(1, math.ceil(q * len(freq_row) - 1e-9))
    order = sorted(range(len(freq_row)), key=lambda e: (-float(freq_row[e]), e))
    return set(order[:n])


def common_experts(freqs: dict[str, np.ndarray], q: float) -> list[list[int]]:
    """Per layer, the experts in the top q share by frequency in every domain ([L, E] arrays)."""
    if not freqs:
        raise SurgeonError("common experts: no domains")
    arrays = list(freqs.values())
    out = []
    for li in range(arrays[0].shape[0]):
        sets = [top_fraction(a[li], q) for a in arrays]
        out.append(sorted(set.intersection(*sets)))
    return out


# ---------------------------------------------------------------- what an expert does
def expert_tokens(stats: RoutingStats, tokenizer, layer: int, expert: int, *, n: int = 10,
                  context: int = 6, examples: int = 2) -> list[dict]:
    """The tokens most often routed to `expert` in `layer`, with how specific that is and contexts.

    share: of all occurrences of the token in the corpus, the part routed to this expert.
    """
    li = stats.layer_index(layer)
    hit = (stats.selected[:, li, :] == expert).any(1)
    ids, counts = np.unique(stats.token_ids[hit], return_counts=True)
    total = dict(zip(*np.unique(stats.token_ids, return_counts=True)))
    order = np.argsort(-counts, kind="stable")[:n]
    where = np.flatnonzero(hit)
    out = []
    for i in order:
        tid = int(ids[i])
        ctx = []
        for pos in where[stats.token_ids[where] == tid][:examples]:
            lo = pos
            while lo > 0 and pos - lo < context and stats.doc[lo - 1] == stats.doc[pos]:
                lo -= 1
            before = tokenizer.decode(stats.token_ids[lo:pos].tolist())
            ctx.append(f"{before}[{tokenizer.decode([tid])}]")
        out.append({"token": tokenizer.decode([tid]), "id": tid, "count": int(counts[i]),
                    "share": round(float(counts[i]) / float(total[tid]), 6), "contexts": ctx})
    return out


def cofiring(stats: RoutingStats, layer: int, expert: int) -> dict:
    """P(j selected | expert selected) in the same layer and in the next MoE layer."""
    li = stats.layer_index(layer)
    n = max(float(stats.counts[li, expert]), 1.0)
    same = stats.cofire[li, expert] / n
    same = same.copy()
    same[expert] = 0.0  # itself, trivially 1
    nxt = stats.cofire_next[li, expert] / n if li < len(stats.layers) - 1 else None
    return {"same_layer": same, "next_layer": nxt}


# ---------------------------------------------------------------- routing drift
def jsd(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint), along `axis`."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / np.maximum(p.sum(axis, keepdims=True), 1e-300)
    q = q / np.maximum(q.sum(axis, keepdims=True), 1e-300)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1)), 0.0).sum(axis)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def routing_drift(a: RoutingStats, b: RoutingStats) -> dict:
    """Per MoE layer: JSD between the two models' load distributions (usage) and, where both kept
    per-token probabilities of the same tokens, the mean per-token JSD of the router distributions."""
    if a.layers != b.layers or a.num_experts != b.num_experts:
        raise SurgeonError("routing drift: the two models have different MoE layers or expert counts")
    out = {"layers": list(a.layers), "usage_jsd": jsd(a.usage, b.usage, axis=1)}
    if a.probs is not None and b.probs is not None:
        if not np.array_equal(a.token_ids, b.token_ids):
            raise SurgeonError("routing drift: the two probes did not read the same tokens")
        out["token_jsd"] = jsd(a.probs, b.probs, axis=2).mean(0)
    return out


# ---------------------------------------------------------------- expert similarity across donors
def expert_similarity(donor_a, donor_b, layers=None) -> dict[int, np.ndarray]:
    """Per layer, cosine similarity [E_a, E_b] of experts' flattened weights (all their tensors,
    in name order), read from the donors' memory maps. Diagonal: the same expert in both."""
    import torch

    from surgeon.live.hybrid import TensorReader

    for d in (donor_a, donor_b):
        if not d.anatomy.experts_per_layer:
            raise SurgeonError(f"{d.path}: {d.model_type} has no routed experts")
    reader = TensorReader({"a": donor_a, "b": donor_b})
    wanted = sorted(donor_a.anatomy.experts_per_layer) if layers is None else list(layers)
    out = {}
    for layer in wanted:
        mats = []
        for key, d in (("a", donor_a), ("b", donor_b)):
            n = d.anatomy.experts_per_layer.get(layer, 0)
            if n == 0:
                raise SurgeonError(f"{d.path}: layer {layer} has no routed experts")
            rows = []
            for e in range(n):
                pieces = [reader.read(key, t) if row is None else reader.read(key, t)[row]
                          for t, row in d.anatomy.expert_slices(layer, e)]
                rows.append(torch.cat([p.float().flatten() for p in pieces]))
            mats.append(torch.stack(rows))
        if mats[0].shape[1] != mats[1].shape[1]:
            raise SurgeonError(f"layer {layer}: experts have different sizes in {donor_a.path} and {donor_b.path}")
        a = torch.nn.functional.normalize(mats[0].double(), dim=1)
        b = torch.nn.functional.normalize(mats[1].double(), dim=1)
        out[layer] = (a @ b.T).numpy()
    return out


# ---------------------------------------------------------------- selection actions (SPECs)
def _group(per_layer: dict[int, tuple[int, ...]], donor: str) -> list[Assignment]:
    """One Assignment per distinct expert set, over every layer that takes that set."""
    by_set: dict[tuple[int, ...], list[int]] = {}
    for layer, experts in sorted(per_layer.items()):
        if experts:
            by_set.setdefault(tuple(sorted(experts)), []).append(layer)
    return [Assignment("expert", donor, tuple(ls), es) for es, ls in by_set.items()]


def most_used(stats: RoutingStats, n: int, layers=None) -> dict[int, tuple[int, ...]]:
    if n < 1:
        raise SurgeonError(f"take: N must be at least 1, got {n}")
    wanted = stats.layers if layers is None else list(layers)
    out = {}
    for layer in wanted:
        f = stats.frequency[stats.layer_index(layer)]
        out[layer] = tuple(sorted(sorted(range(len(f)), key=lambda e: (-float(f[e]), e))[:n]))
    return out


def take_most_used(stats: RoutingStats, n: int, donor: str, layers=None) -> list[Assignment]:
    """'The N experts most used on this corpus in layers L from donor B' as plan assignments."""
    return _group(most_used(stats, n, layers), donor)


def most_changed(similarity: dict[int, np.ndarray], n: int, layers=None) -> dict[int, tuple[int, ...]]:
    if n < 1:
        raise SurgeonError(f"take: N must be at least 1, got {n}")
    wanted = sorted(similarity) if layers is None else list(layers)
    out = {}
    for layer in wanted:
        if layer not in similarity:
            raise SurgeonError(f"layer {layer}: no expert similarity computed (layers: {sorted(similarity)})")
        d = np.diag(similarity[layer])
        out[layer] = tuple(sorted(sorted(range(len(d)), key=lambda e: (float(d[e]), e))[:n]))
    return out


def take_most_changed(similarity: dict[int, np.ndarray], n: int, donor: str, layers=None) -> list[Assignment]:
    """'The N experts post-training changed most (lowest cosine to the base)' as plan assignments."""
    return _group(most_changed(similarity, n, layers), donor)


# ---------------------------------------------------------------- text views
SHADES = " ░▒▓█"


def heatmap_lines(values: np.ndarray, row_labels: list, *, scale: float | None = None, marks=None,
                  fmt: str = "{:4.2f}") -> list[str]:
    """A layers x experts text heatmap: a shade block and the value per cell; `marks[row]` is a set
    of columns drawn with a `*` (common experts). Negative values (differences) shade by magnitude."""
    values = np.asarray(values, dtype=float)
    top = scale or (float(np.abs(values).max()) or 1.0)
    cols = values.shape[1]
    width = len(fmt.format(0.0)) + 2
    lines = ["layer " + "".join(f"{'e' + str(e):>{width}}" for e in range(cols))]
    for r, label in enumerate(row_labels):
        cells = []
        for e in range(cols):
            v = values[r, e]
            shade = SHADES[min(len(SHADES) - 1, int(round(abs(v) / top * (len(SHADES) - 1))))]
            star = "*" if marks is not None and e in marks[r] else " "
            cells.append(f"{star}{shade}{fmt.format(v)}".rjust(width))
        lines.append(f"{label:>5} " + "".join(cells))
    return lines

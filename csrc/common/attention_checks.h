// Host-side argument checks shared by the CPU and CUDA entry points of the attention ops:
// every check that does not depend on the backend lives here, once. The backends pass their
// device and whether they have float64; what only one backend can check (the CPU reads
// cu_seqlens and cache_seqlens on the host) stays with it, under one documented rule.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "attention.h"
#include "attention_dropout.h"

namespace pk {
namespace attention {

// attn_mask: bool (true = attend) or float32 (added), shaped (batch, heads, Sq, Sk) (broadcasts
// arrive expanded, with zero strides). The device is checked at the call sites.
inline void check_attn_mask(const at::Tensor& mk, int64_t batch, int64_t heads, int64_t sq, int64_t sk) {
  TORCH_CHECK(mk.scalar_type() == at::kBool || mk.scalar_type() == at::kFloat,
              "attn_mask: expected bool or float32 (convert float masks first), got ", mk.scalar_type());
  TORCH_CHECK(mk.dim() == 4 && mk.size(0) == batch && mk.size(1) == heads && mk.size(2) == sq && mk.size(3) == sk,
              "attn_mask: expected shape [", batch, ", ", heads, ", ", sq, ", ", sk, "] (expand it), got ",
              mk.sizes());
}

// Points the kernel parameters at attn_mask (checked by check_layout): mask_bool or
// mask_float, and its four strides m_sb, m_sh, m_si, m_sj (the CPU Problem and the CUDA AttnParams share
// these names).
template <typename KernelParams>
void set_attn_mask(KernelParams& p, const at::Tensor& mk) {
  if (mk.scalar_type() == at::kBool)
    p.mask_bool = mk.data_ptr<bool>();
  else
    p.mask_float = mk.data_ptr<float>();
  p.m_sb = mk.stride(0);
  p.m_sh = mk.stride(1);
  p.m_si = mk.stride(2);
  p.m_sj = mk.stride(3);
}

// The shapes of a forward/backward call, as both backends' parameter structs need them.
struct Layout {
  bool varlen = false;
  int64_t batch = 0;            // sequences (cu_seqlens_q.numel() - 1 when varlen)
  int64_t H = 0, Hk = 0;        // query heads, key/value heads (H % Hk == 0)
  int64_t D = 0, Dv = 0;        // head dims of q/k and of v/out
  int64_t sq = 0, sk = 0;       // dense lengths (0 when varlen: the backends fill maxima if they can)
  int64_t total_q = 0, total_k = 0;  // tokens on each side
  // The window as the kernels use it: a side wider than any sequence of the call is unbounded
  // (-1), so that the visibility arithmetic of csrc/common/attention.h (i + offset -/+ window)
  // cannot overflow for huge values.
  int64_t window_left = -1, window_right = -1;
};

// Largest |scale| for float32 / float16 / bfloat16 inputs: their scores are float32, and the
// CUDA kernels work with scale * log2(e), which must stay finite.
constexpr double kMaxFloatScale = 1e38;

// One float operand: on `dev`, a supported float dtype (float64 only where the backend has it).
inline void check_float_operand(const at::Tensor& t, const char* name, const at::Device& dev, bool allow_float64) {
  TORCH_CHECK(t.device() == dev, name, ": expected a tensor on ", dev, " (the device of q), got one on ", t.device());
  const auto dt = t.scalar_type();
  if (!allow_float64)
    TORCH_CHECK(dt != at::kDouble, name,
                ": float64 attention runs on the CPU only (use float32, float16 or bfloat16 on ", dev.type(), ")");
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, name,
              ": expected float32, float16, bfloat16", allow_float64 ? " or float64" : "", ", got ", dt);
}

// cu_seqlens: int32 [batch + 1] on `dev`. Its values are checked by the CPU backend only (the
// CUDA kernels cannot read them without a host sync; they clamp every offset into the tensors'
// bounds instead, see csrc/cuda/attention_common.cuh).
inline void check_cu_seqlens_shape(const at::Tensor& cu, const char* name, int64_t batch, const at::Device& dev) {
  TORCH_CHECK(cu.scalar_type() == at::kInt, name, ": expected an int32 tensor, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == dev, name, ": expected a tensor on ", dev, " (the device of q), got one on ",
              cu.device());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == batch + 1, name, ": expected shape [", batch + 1, "], got ",
              cu.sizes());
}

// Every check of a forward/backward call that does not depend on the backend: q, k, v of one
// dtype on `dev`, 4-D (batch, seqlen, heads, head_dim) or 3-D packed when varlen; heads and
// head dims that fit; a valid window and a finite scale; cu_seqlens and attn_mask shapes.
inline Layout check_layout(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                           const std::optional<at::Tensor>& mask, double scale, int64_t window_left,
                           int64_t window_right, const at::Device& dev, bool allow_float64) {
  check_float_operand(q, "q", dev, allow_float64);
  check_float_operand(k, "k", dev, allow_float64);
  check_float_operand(v, "v", dev, allow_float64);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v: expected one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "cu_seqlens_q, cu_seqlens_k: pass both or neither");
  Layout l;
  l.varlen = cu_q.has_value();
  const int64_t nd = l.varlen ? 3 : 4;
  const char* layout = l.varlen ? "(total_tokens, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK(q.dim() == nd, "q: expected ", nd, " dims ", layout, ", got shape ", q.sizes());
  TORCH_CHECK(k.dim() == nd, "k: expected ", nd, " dims ", layout, ", got shape ", k.sizes());
  TORCH_CHECK(v.dim() == nd, "v: expected ", nd, " dims ", layout, ", got shape ", v.sizes());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window: expected values >= -1 (-1: unbounded), got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", scale);
  if (q.scalar_type() != at::kDouble)
    TORCH_CHECK(std::abs(scale) <= kMaxFloatScale, "scale: expected a magnitude of at most ", kMaxFloatScale,
                " for ", q.scalar_type(), " inputs (their scores are float32), got ", scale);
  l.H = q.size(-2);
  l.Hk = k.size(-2);
  l.D = q.size(-1);
  l.Dv = v.size(-1);
  TORCH_CHECK(v.size(-2) == l.Hk, "k, v: expected the same number of heads, got ", l.Hk, " and ", v.size(-2));
  TORCH_CHECK(l.Hk >= 1 && l.H % l.Hk == 0, "heads: the query heads (", l.H,
              ") must be a multiple of the key/value heads (", l.Hk, ")");
  TORCH_CHECK(l.H <= (1 << 20), "heads: at most ", (1 << 20), " supported, got ", l.H);
  TORCH_CHECK(k.size(-1) == l.D, "head_dim: q and k must match, got ", l.D, " and ", k.size(-1));
  TORCH_CHECK(l.D >= 1 && l.D <= kMaxHeadDim, "head_dim: expected 1 to ", kMaxHeadDim, ", got ", l.D);
  TORCH_CHECK(l.Dv >= 1 && l.Dv <= kMaxHeadDim, "head_dim of v: expected 1 to ", kMaxHeadDim, ", got ", l.Dv);
  if (l.varlen) {
    TORCH_CHECK(!mask.has_value(), "attn_mask: not supported with cu_seqlens (varlen)");
    l.batch = cu_q->numel() - 1;
    TORCH_CHECK(l.batch >= 0, "cu_seqlens_q: expected at least one element");
    TORCH_CHECK(l.batch < (int64_t(1) << 31), "cu_seqlens_q: too many sequences");
    check_cu_seqlens_shape(*cu_q, "cu_seqlens_q", l.batch, dev);
    check_cu_seqlens_shape(*cu_k, "cu_seqlens_k", l.batch, dev);
    TORCH_CHECK(v.size(0) == k.size(0), "k, v: expected the same token count, got ", k.size(0), " and ", v.size(0));
    l.total_q = q.size(0);
    l.total_k = k.size(0);
  } else {
    l.batch = q.size(0);
    TORCH_CHECK(k.size(0) == l.batch && v.size(0) == l.batch, "batch: q, k, v must match, got ", l.batch, ", ",
                k.size(0), ", ", v.size(0));
    TORCH_CHECK(v.size(1) == k.size(1), "k, v: expected the same sequence length, got ", k.size(1), " and ",
                v.size(1));
    TORCH_CHECK(l.batch < (int64_t(1) << 31), "batch: too large");
    l.sq = q.size(1);
    l.sk = k.size(1);
    l.total_q = l.batch * l.sq;
    l.total_k = l.batch * l.sk;
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == dev, "attn_mask: expected a tensor on ", dev, ", got one on ", mask->device());
    check_attn_mask(*mask, l.batch, l.H, l.sq, l.sk);
  }
  // Every sequence has at most sq + sk (dense) or total_q + total_k (varlen; the CUDA kernels
  // clamp cu_seqlens into these bounds) queries and keys, and a query sees at most that far.
  const int64_t reach = std::max(l.sq + l.sk, l.total_q + l.total_k);
  l.window_left = window_left > reach ? -1 : window_left;
  l.window_right = window_right > reach ? -1 : window_right;
  return l;
}

// prefix_lens (prefix-LM, csrc/common/attention.h): int32 [batch] on `dev`, one bidirectional
// prefix length per sequence, in keys of that sequence. A strided tensor is replaced by a
// contiguous copy (the caller keeps it alive). Its values are checked by the CPU backend only
// (check_prefix_lens_values); what reaches the kernels is clamped into [0, sk_b] (make_window),
// the rule of both backends. Points the kernel parameters' prefix_lens at the values (the CPU
// Problem and the CUDA AttnParams share the name).
template <typename KernelParams>
void set_prefix_lens(KernelParams& p, std::optional<at::Tensor>& prefix_lens, int64_t batch, const at::Device& dev) {
  if (!prefix_lens.has_value()) return;
  const at::Tensor& pl = *prefix_lens;
  TORCH_CHECK(pl.scalar_type() == at::kInt, "prefix_lens: expected an int32 tensor, got ", pl.scalar_type());
  TORCH_CHECK(pl.device() == dev, "prefix_lens: expected a tensor on ", dev, " (the device of q), got one on ",
              pl.device());
  TORCH_CHECK(pl.dim() == 1 && pl.size(0) == batch, "prefix_lens: expected shape [", batch,
              "] (one length per sequence), got ", pl.sizes());
  *prefix_lens = pl.contiguous();
  p.prefix_lens = prefix_lens->data_ptr<int32_t>();
}

// The values of prefix_lens on the host (CPU backend): row b within [0, len_k(b)].
template <typename LenK>
void check_prefix_lens_values(const int32_t* pl, int64_t batch, LenK len_k) {
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(pl[b] >= 0 && pl[b] <= len_k(b), "prefix_lens: expected values in [0, keys of the sequence], got ",
                pl[b], " at row ", b, " (", len_k(b), " keys)");
}

// Score modifiers (csrc/common/attention.h): softcap 0 = off, else a finite number > 0 (for
// float32 / float16 / bfloat16 inputs, a normal float32 of magnitude at most kMaxFloatScale,
// as the kernels use it in float); alibi_slopes float32 [heads] or [batch, heads] on `dev`. The
// slope values are checked (finite) where the backend reads them on the host (`host_values`:
// the CPU); CUDA cannot without a sync, and a NaN or infinite slope gives NaN rows there.
// Sets the kernel parameters softcap, alibi, alibi_sb, alibi_sh (the CPU Problem and the CUDA
// AttnParams share these names; strides in elements, alibi_sb 0 for [heads] slopes).
template <typename KernelParams>
void set_score_mods(KernelParams& p, double softcap, const std::optional<at::Tensor>& slopes, at::ScalarType dtype,
                    const at::Device& dev, bool host_values) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap: expected a finite number > 0 (0 = off), got ",
              softcap);
  if (softcap > 0 && dtype != at::kDouble)
    TORCH_CHECK(softcap >= std::numeric_limits<float>::min() && softcap <= kMaxFloatScale,
                "softcap: expected a value in [", std::numeric_limits<float>::min(), ", ", kMaxFloatScale, "] for ",
                dtype, " inputs (their scores are float32), got ", softcap);
  p.softcap = static_cast<decltype(p.softcap)>(softcap);
  p.alibi = nullptr;
  p.alibi_sb = p.alibi_sh = 0;
  if (!slopes.has_value()) return;
  const at::Tensor& a = *slopes;
  const int64_t batch = p.batch, H = p.H;
  TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes: expected a float32 tensor, got ", a.scalar_type());
  TORCH_CHECK(a.device() == dev, "alibi_slopes: expected a tensor on ", dev, " (the device of q), got one on ",
              a.device());
  TORCH_CHECK((a.dim() == 1 && a.size(0) == H) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == H),
              "alibi_slopes: expected shape [", H, "] or [", batch, ", ", H, "], got ", a.sizes());
  if (host_values && a.numel() > 0)
    TORCH_CHECK(at::isfinite(a).all().item<bool>(), "alibi_slopes: expected finite values");
  p.alibi = a.data_ptr<float>();
  p.alibi_sb = a.dim() == 2 ? a.stride(0) : 0;
  p.alibi_sh = a.stride(-1);
}

// Attention dropout (csrc/common/attention_dropout.h): dropout_p in [0, 1]; dropout_seed an int64
// tensor [2] (seed, offset with offset in [0, 2^32)) on the CPU or on `dev`, required when
// dropout_p > 0 (ignored otherwise). `host_values`: the backend reads a seed on `dev` on the host
// (the CPU); otherwise (CUDA) a seed on the GPU is read by the kernels through seed_dev, and its
// offset is taken modulo 2^32 there. Sets the kernel parameters' `dropout`.
template <typename KernelParams>
void set_dropout(KernelParams& p, double dropout_p, const std::optional<at::Tensor>& seed, const at::Device& dev,
                 bool host_values) {
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0.0 && dropout_p <= 1.0,
              "dropout_p: expected a probability in [0, 1], got ", dropout_p);
  p.dropout = Dropout();
  if (dropout_p == 0.0) return;
  TORCH_CHECK(seed.has_value(), "dropout_seed: required when dropout_p > 0 (int64 [2]: seed, offset)");
  const at::Tensor& s = *seed;
  TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.size(0) == 2,
              "dropout_seed: expected an int64 tensor of shape [2] (seed, offset), got ", s.scalar_type(),
              " of shape ", s.sizes());
  TORCH_CHECK(s.device().is_cpu() || s.device() == dev, "dropout_seed: expected a CPU tensor or one on ", dev,
              ", got one on ", s.device());
  p.dropout.threshold = dropout_threshold(dropout_p);
  p.dropout.rscale = static_cast<float>(dropout_rscale(p.dropout.threshold));
  // p < 2^-17 rounds to threshold 0: every element kept, the call runs as without dropout
  if (s.device().is_cpu() || host_values) {
    const at::Tensor c = s.cpu();
    const int64_t* v = c.data_ptr<int64_t>();
    TORCH_CHECK(v[1] >= 0 && v[1] <= int64_t(0xFFFFFFFF), "dropout_seed: expected an offset in [0, 2^32), got ", v[1]);
    p.dropout.seed = static_cast<uint64_t>(v[0]);
    p.dropout.offset = static_cast<uint32_t>(v[1]);
  } else {
    p.dropout.seed_dev = s.data_ptr<int64_t>();
  }
}

// The saved forward tensors handed to the backward: out and dout shaped like q with v's head
// dim, in q's dtype; lse (and its gradient dlse) in lse_type, shaped (batch, heads, sq), or
// (heads, total_q) when varlen; all on `dev`.
inline void check_backward_inputs(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                                  const std::optional<at::Tensor>& dlse, const at::Tensor& q, const Layout& l,
                                  at::ScalarType lse_type, const at::Device& dev) {
  std::vector<int64_t> o_shape(q.sizes().begin(), q.sizes().end());
  o_shape.back() = l.Dv;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(o_shape) && dout.sizes() == at::IntArrayRef(o_shape),
              "out, dout: expected shape ", at::IntArrayRef(o_shape), ", got ", out.sizes(), " and ", dout.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(),
              "out, dout: expected dtype ", q.scalar_type(), ", got ", out.scalar_type(), " and ", dout.scalar_type());
  TORCH_CHECK(out.device() == dev && dout.device() == dev && lse.device() == dev, "out, dout, lse: expected tensors on ",
              dev, ", got ", out.device(), ", ", dout.device(), ", ", lse.device());
  const std::vector<int64_t> lse_shape =
      l.varlen ? std::vector<int64_t>{l.H, l.total_q} : std::vector<int64_t>{l.batch, l.H, l.sq};
  TORCH_CHECK(lse.scalar_type() == lse_type && lse.sizes() == at::IntArrayRef(lse_shape), "lse: expected ", lse_type,
              " of shape ", at::IntArrayRef(lse_shape), ", got ", lse.scalar_type(), " of shape ", lse.sizes());
  if (dlse.has_value())
    TORCH_CHECK(dlse->scalar_type() == lse_type && dlse->sizes() == lse.sizes() && dlse->device() == dev,
                "dlse: expected ", lse_type, " of shape ", lse.sizes(), " on ", dev, ", got ", dlse->scalar_type(),
                " of shape ", dlse->sizes(), " on ", dlse->device());
}

// k_new / v_new against the caches (shapes and dtypes) of `capacity` positions per row.
// Returns the number of new tokens.
inline int64_t check_kv_new(const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t B, int64_t capacity,
                            const at::Device& dev) {
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "k_new, v_new: pass both or neither");
  if (!k_new.has_value()) return 0;
  TORCH_CHECK(k_new->dim() == 4 && v_new->dim() == 4,
              "k_new, v_new: expected 4 dims (batch, seqlen_new, kv_heads, head_dim), got shapes ", k_new->sizes(),
              " and ", v_new->sizes());
  TORCH_CHECK(k_new->device() == dev && v_new->device() == dev, "k_new, v_new: expected tensors on ", dev,
              " (the device of q), got ", k_new->device(), " and ", v_new->device());
  TORCH_CHECK(k_new->size(0) == B && v_new->size(0) == B && v_new->size(1) == k_new->size(1),
              "k_new, v_new: expected batch ", B, " and one length, got shapes ", k_new->sizes(), " and ",
              v_new->sizes());
  TORCH_CHECK(k_new->size(2) == k_cache.size(2) && k_new->size(3) == k_cache.size(3),
              "k_new: expected (heads, head_dim) of k_cache ", k_cache.sizes().slice(2), ", got ",
              k_new->sizes().slice(2));
  TORCH_CHECK(v_new->size(2) == v_cache.size(2) && v_new->size(3) == v_cache.size(3),
              "v_new: expected (heads, head_dim) of v_cache ", v_cache.sizes().slice(2), ", got ",
              v_new->sizes().slice(2));
  TORCH_CHECK(k_new->scalar_type() == k_cache.scalar_type() && v_new->scalar_type() == v_cache.scalar_type(),
              "k_new, v_new: expected the dtype of the cache ", k_cache.scalar_type(), ", got ",
              k_new->scalar_type(), " and ", v_new->scalar_type());
  TORCH_CHECK(k_new->size(1) <= capacity, "k_new: ", k_new->size(1), " new tokens do not fit a cache of ", capacity);
  return k_new->size(1);
}

// Whether the memory spans of a and b (first to last element) intersect. Conservative: two
// interleaved views that never share an element count as intersecting. at::get_overlap_status
// gives up ("too hard") on any view that is not dense, such as k_cache[:, :1].
inline bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // offset of the last element, in elements (strides are never negative)
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* p = static_cast<const char*>(t.data_ptr());
    return std::make_pair(p, p + (last + 1) * t.element_size());
  };
  const auto sa = span(a), sb = span(b);
  return sa.first < sb.second && sb.first < sa.second;
}

// Positions per kv-cache row: key counts (cache_seqlens + seqlen_new) stay int32.
constexpr int64_t kMaxCachePositions = (int64_t(1) << 31) - 1;

// A kv-cache call as both backends see it (check_kvcache).
struct KvCacheLayout {
  int64_t s_new = 0;       // new tokens per row (k_new.size(1), 0 without k_new)
  int64_t capacity = 0;    // positions per row: max_seqlen, or max_blocks * page_size when paged
  bool paged = false;
  int64_t page_size = 0;   // paged: k_cache.size(1)
  int64_t num_blocks = 0;  // paged: k_cache.size(0)
  // The window as the kernels use it (causal: right = 0), a side wider than any row
  // unbounded (-1), as check_layout does for the forward.
  int64_t window_left = -1, window_right = -1;
};

// The kv-cache call's own arguments (q against the caches is checked by check_layout after
// this, with kvcache_layout_view standing in for a paged cache): caches (batch, max_seqlen,
// kv_heads, head_dim), or (num_blocks, page_size, kv_heads, head_dim) of one page layout with
// block_table int32 [batch, max_blocks] on `dev`; caches that can be written in place, with no
// two elements sharing memory (an expanded cache would let one row's keys land in another's)
// and not overlapping each other; cache_seqlens int32 [batch] on `dev`; a window of values
// >= -1. The block ids themselves are read by the CPU op only (first_bad_page in
// csrc/common/attention.h holds the rule on both backends).
inline KvCacheLayout check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                                   const std::optional<at::Tensor>& v_new, bool causal, int64_t window_left,
                                   int64_t window_right, const std::optional<at::Tensor>& block_table,
                                   const at::Device& dev) {
  TORCH_CHECK(q.dim() == 4, "q: expected 4 dims (batch, seqlen, heads, head_dim), got shape ", q.sizes());
  KvCacheLayout c;
  c.paged = block_table.has_value();
  const char* layout = c.paged ? "(num_blocks, page_size, kv_heads, head_dim)" : "(batch, max_seqlen, kv_heads, head_dim)";
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "k_cache, v_cache: expected 4 dims ", layout,
              ", got shapes ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t B = q.size(0);
  if (c.paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK(bt.scalar_type() == at::kInt, "block_table: expected an int32 tensor, got ", bt.scalar_type());
    TORCH_CHECK(bt.device() == dev, "block_table: expected a tensor on ", dev, " (the device of q), got one on ",
                bt.device());
    TORCH_CHECK(bt.dim() == 2 && bt.size(0) == B, "block_table: expected shape [", B, ", max_blocks], got ",
                bt.sizes());
    c.page_size = k_cache.size(1);
    c.num_blocks = k_cache.size(0);
    TORCH_CHECK(c.page_size > 0, "k_cache: expected a page size (dim 1) > 0 with block_table, got shape ",
                k_cache.sizes());
    TORCH_CHECK(v_cache.size(0) == c.num_blocks && v_cache.size(1) == c.page_size,
                "v_cache: expected the page layout (num_blocks, page_size) = (", c.num_blocks, ", ", c.page_size,
                ") of k_cache, got (", v_cache.size(0), ", ", v_cache.size(1), ")");
    TORCH_CHECK(c.num_blocks < (int64_t(1) << 31), "k_cache: at most 2^31 - 1 blocks (int32 block ids), got ",
                c.num_blocks);
    TORCH_CHECK(bt.size(1) <= kMaxCachePositions / c.page_size, "block_table: ", bt.size(1), " blocks of ",
                c.page_size, " positions per row exceed ", kMaxCachePositions, " positions (int32 cache_seqlens)");
    c.capacity = bt.size(1) * c.page_size;
  } else {
    TORCH_CHECK(k_cache.size(0) == B && v_cache.size(0) == B, "k_cache, v_cache: expected batch ", B, ", got ",
                k_cache.size(0), " and ", v_cache.size(0));
    TORCH_CHECK(v_cache.size(1) == k_cache.size(1), "v_cache: expected max_seqlen ", k_cache.size(1),
                " (that of k_cache), got ", v_cache.size(1));
    c.capacity = k_cache.size(1);
    TORCH_CHECK(c.capacity <= kMaxCachePositions, "k_cache: ", c.capacity, " positions per row exceed ",
                kMaxCachePositions, " (int32 cache_seqlens)");
  }
  TORCH_CHECK(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
              "k_cache, v_cache: expected a contiguous last dimension (they are written in place)");
  c.s_new = check_kv_new(k_new, v_new, k_cache, v_cache, B, c.capacity, dev);
  if (c.s_new > 0) {
    TORCH_CHECK(at::has_internal_overlap(k_cache) != at::MemOverlap::Yes &&
                    at::has_internal_overlap(v_cache) != at::MemOverlap::Yes,
                "k_cache, v_cache: written in place, so no two elements may share memory (an expanded or "
                "stride-0 view was given; pass a real tensor, e.g. .contiguous())");
    const auto kv = at::get_overlap_status(k_cache, v_cache);
    TORCH_CHECK(kv != at::MemOverlapStatus::Full && kv != at::MemOverlapStatus::Partial,
                "k_cache, v_cache: written in place, so they must not overlap each other");
    for (const at::Tensor* cache : {&k_cache, &v_cache}) {
      for (const at::Tensor* n : {&*k_new, &*v_new})
        TORCH_CHECK(!spans_intersect(*cache, *n), "k_new, v_new: must not share memory with the caches they are ",
                    "written into");
      TORCH_CHECK(!spans_intersect(*cache, q), "q: must not share memory with the caches (they are written in place)");
      if (c.paged)
        TORCH_CHECK(!spans_intersect(*cache, *block_table),
                    "block_table: must not share memory with the caches (they are written in place)");
    }
  }
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt, "cache_seqlens: expected an int32 tensor, got ",
              cache_seqlens.scalar_type());
  TORCH_CHECK(cache_seqlens.device() == dev, "cache_seqlens: expected a tensor on ", dev, " (the device of q), got ",
              cache_seqlens.device());
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B, "cache_seqlens: expected shape [", B, "], got ",
              cache_seqlens.sizes());
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window: expected values >= -1 (-1: unbounded), got (",
              window_left, ", ", window_right, ")");
  if (causal) window_right = 0;
  const int64_t reach = q.size(1) + c.capacity;  // a query sees at most this far
  c.window_left = window_left > reach ? -1 : window_left;
  c.window_right = window_right > reach ? -1 : window_right;
  return c;
}

// What check_layout checks q against for a kv-cache call: the caches themselves, or for a paged
// cache an empty (batch, 0, kv_heads, head_dim) tensor of its dtype and device (the backends
// then point their parameters at the pages).
inline at::Tensor kvcache_layout_view(const at::Tensor& cache, int64_t batch, bool paged) {
  if (!paged) return cache;
  return at::empty({batch, 0, cache.size(2), cache.size(3)}, cache.options());
}

}  // namespace attention
}  // namespace pk

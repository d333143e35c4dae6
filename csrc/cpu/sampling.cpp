// CPU kernels of the sampling family: sample (penalties, temperature, top-k, top-p, min-p
// and the draw in one op), top_k_top_p_filter and speculative_accept.
//
// Rows run in parallel (at::parallel_for), each row start to finish on one thread with a
// thread-local workspace, so the thread count never changes a result. The math (values,
// weights, fixed-point masses, the bin choice of each radix level, the draw) is the shared
// code of csrc/common/sampling.h, so the CUDA kernels reach the same thresholds and the
// same tokens. What differs is only how the passes are organised: on the CPU the first
// radix level runs over the whole row and then the row is compacted to the candidates
// (the elements at or above the chosen bin), so the later levels, the weights, the total
// and the draw touch a few hundred entries instead of the vocabulary.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "../common/sampling.h"
#include "../common/sampling_ops.h"

namespace pk {
namespace {

using namespace sampling;

struct Workspace {
  std::vector<float> v;        // values (penalised, scaled, mode-mapped)
  std::vector<float> e;        // weights exp(v - M); only the candidates' when a list is used
  std::vector<uint32_t> key;   // order-preserving keys of v (when a filter is on)
  std::vector<uint32_t> cand;  // candidate indices, ascending
  std::vector<uint32_t> tmp;
  std::vector<int64_t> prev;
  uint64_t hist[kMaxBins];
};

// ---- vectorised passes (GCC/Clang vector extensions: SSE2 on the x86-64 baseline, NEON on
// arm64). Each lane performs exactly the operations of the scalar functions in
// common/sampling.h, so the results are bit-identical to them (and to the CUDA kernels).
// f4 / i4 / u4 and the lane helpers: csrc/common/sampling.h.
constexpr int kLanes = 4;

inline f4 load4(const float* p) {
  f4 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void store4(float* p, f4 x) { std::memcpy(p, &x, sizeof(x)); }

// e[i] = exp_nonpos(v[i] - m)
void weights_all(const float* v, float* e, int64_t V, float m) {
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) store4(e + i, exp_nonpos_lanes(load4(v + i) - m));
  for (; i < V; ++i) e[i] = exp_nonpos(fsub(v[i], m));
}

// The largest value of v, NaN ignored (-inf when there is none).
float max_of(const float* v, int64_t V) {
  int64_t i = 0;
  f4 mv = f4{} + neg_inf();
  for (; i + kLanes <= V; i += kLanes) {
    const f4 x = load4(v + i);
    mv = x > mv ? x : mv;
  }
  float m = neg_inf();
  for (int l = 0; l < kLanes; ++l) m = mv[l] > m ? mv[l] : m;
  for (; i < V; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// v[i] = scaled_value(v[i], mx, t) (a normal row: mx finite).
void scale_all(float* v, int64_t V, float mx, float t) {
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    const f4 q = (load4(v + i) - mx) / t;
    store4(v + i, (q != q) ? f4{} + neg_inf() : q);  // NaN logit, or -inf / +inf
  }
  for (; i < V; ++i) v[i] = scaled_value(v[i], mx, t);
}

void keys_all(const float* v, uint32_t* key, int64_t V) {
  int64_t i = 0;
  for (; i + kLanes <= V; i += kLanes) {
    const f4 x = load4(v + i) + 0.0f;
    const i4 b = (i4)x;
    const u4 k = (u4)b ^ (u4)((b >> 31) | INT32_MIN);
    std::memcpy(key + i, &k, sizeof(k));
  }
  for (; i < V; ++i) key[i] = float_key(v[i]);
}

template <typename scalar_t>
void load_row(const scalar_t* x, int64_t V, float* v) {
  for (int64_t i = 0; i < V; ++i) v[i] = static_cast<float>(x[i]);
}

void apply_penalties(const Params& p, int64_t b, float* v, Workspace& ws) {
  const int64_t* row = p.prev + b * p.T;
  ws.prev.clear();
  for (int64_t j = 0; j < p.T; ++j) {
    if (row[j] >= 0 && row[j] < p.V) ws.prev.push_back(row[j]);
  }
  std::sort(ws.prev.begin(), ws.prev.end());
  const float rep = p.repetition_of(b), pres = p.presence_of(b), freq = p.frequency_of(b);
  for (size_t j = 0; j < ws.prev.size();) {
    size_t k = j;
    while (k < ws.prev.size() && ws.prev[k] == ws.prev[j]) ++k;
    const int64_t id = ws.prev[j];
    v[id] = penalize(v[id], static_cast<int64_t>(k - j), rep, pres, freq);
    j = k;
  }
}

// The kept set of a row: {i in S : key[i] >= threshold and (no min-p or e[i] >= min_p)},
// S = the whole row (all) or ws.cand.
struct Selection {
  int mode = kNormal;
  float max_value = 0.0f;
  bool all = true;
  bool use_key = false;
  uint32_t threshold = 0;
  bool minp = false;
  float min_p = 0.0f;
  bool kept(const Workspace& ws, uint32_t i) const {
    return (!use_key || ws.key[i] >= threshold) && (!minp || ws.e[i] >= min_p);
  }
};

template <typename F>
void for_each(const Selection& s, const Workspace& ws, int64_t V, F&& f) {
  if (s.all) {
    for (int64_t i = 0; i < V; ++i) f(static_cast<uint32_t>(i));
  } else {
    for (uint32_t i : ws.cand) f(i);
  }
}

// Keep the candidates with key >= lower (order kept).
void compact(Workspace& ws, bool from_all, int64_t V, uint32_t lower) {
  ws.tmp.clear();
  if (from_all) {
    const uint32_t* key = ws.key.data();
    for (int64_t i = 0; i < V; ++i) {
      if (key[i] >= lower) ws.tmp.push_back(static_cast<uint32_t>(i));
    }
  } else {
    for (uint32_t i : ws.cand) {
      if (ws.key[i] >= lower) ws.tmp.push_back(i);
    }
  }
  ws.cand.swap(ws.tmp);
}

// Values, mode and thresholds of one row; ws.v must hold the (penalised) logits.
// need_all_e: the caller needs the weights of the whole row (drawing or min-p without a list).
Selection select_row(const RowKnobs& k, float temperature, int64_t V, Workspace& ws) {
  Selection s;
  float* v = ws.v.data();
  const float mx = max_of(v, V);
  s.mode = row_mode(mx);
  if (s.mode == kEmpty) return s;
  if (s.mode == kInfinite) {
    for (int64_t i = 0; i < V; ++i) v[i] = row_value(v[i], mx, temperature, kInfinite);
  } else {
    scale_all(v, V, mx, temperature);
  }
  const float m = 0.0f;  // the largest value (row_value)
  s.max_value = m;
  s.minp = k.minp_on();
  s.min_p = k.min_p;
  const bool topk = k.topk_on(V), topp = k.topp_on();
  s.use_key = topk || topp;
  if (s.use_key) {
    keys_all(v, ws.key.data(), V);
  }
  uint64_t* h = ws.hist;
  if (topk) {
    // Radix descent on counts to the k-th largest key; compaction after the first level.
    uint64_t rem = static_cast<uint64_t>(k.top_k), before = 0;
    std::memset(h, 0, sizeof(uint64_t) * level_bins(0));
    for (int64_t i = 0; i < V; ++i) ++h[ws.key[i] >> level_shift(0)];
    int bin = crossing_count(h, level_bins(0), rem, &before);
    rem -= before;
    uint32_t prefix = static_cast<uint32_t>(bin) << level_shift(0);
    bool exact = rem == h[bin];
    compact(ws, true, V, prefix);
    for (int level = 1; level < kLevels && !exact; ++level) {
      std::memset(h, 0, sizeof(uint64_t) * level_bins(level));
      for (uint32_t i : ws.cand) {
        const uint32_t kk = ws.key[i];
        if (level_match(kk, prefix, level)) ++h[level_bin(kk, level)];
      }
      bin = crossing_count(h, level_bins(level), rem, &before);
      rem -= before;
      prefix |= static_cast<uint32_t>(bin) << level_shift(level);
      exact = rem == h[bin];
    }
    s.threshold = prefix;
    compact(ws, false, V, prefix);
    s.all = false;
  }
  // Weights of S.
  float* e = ws.e.data();
  if (s.all) {
    weights_all(v, e, V, m);
  } else {
    for (uint32_t i : ws.cand) e[i] = exp_nonpos(fsub(v[i], m));
  }
  if (topp) {
    uint32_t tp;
    if (!(k.top_p > 0.0f)) {
      tp = float_key(m);  // keep only the most likely value
      compact(ws, s.all, V, tp);
    } else {
      // Radix descent on masses (restricted to the top-k set) to the smallest key whose
      // strictly-greater mass is below top_p * Z_k.
      std::memset(h, 0, sizeof(uint64_t) * level_bins(0));
      uint64_t zk = 0;
      Selection all_keys = s;  // iterate S without the min-p test
      all_keys.minp = false;
      for_each(all_keys, ws, V, [&](uint32_t i) {
        const uint64_t w = mass_of(e[i]);
        zk += w;
        h[ws.key[i] >> level_shift(0)] += w;
      });
      const double limit = topp_limit(k.top_p, zk);
      uint64_t above = 0, before = 0;
      int bin = crossing_mass(h, level_bins(0), above, limit, &before);
      above += before;
      uint32_t prefix = static_cast<uint32_t>(bin) << level_shift(0);
      compact(ws, s.all, V, prefix);
      for (int level = 1; level < kLevels; ++level) {
        std::memset(h, 0, sizeof(uint64_t) * level_bins(level));
        for (uint32_t i : ws.cand) {
          const uint32_t kk = ws.key[i];
          if (level_match(kk, prefix, level)) h[level_bin(kk, level)] += mass_of(e[i]);
        }
        bin = crossing_mass(h, level_bins(level), above, limit, &before);
        above += before;
        prefix |= static_cast<uint32_t>(bin) << level_shift(level);
      }
      tp = prefix;
      compact(ws, false, V, tp);
    }
    s.threshold = std::max(s.threshold, tp);
    s.all = false;
  }
  return s;
}

// One draw from one row of logits xr (the knobs, penalties and seed of row b; words: the
// Philox words of the draw): the token (-1: nothing drawable), its log-probability, and its
// confidence (unmask_step: its kept mass over the kept total; a greedy row's from the filtered
// distribution at temperature 1, only when want_confidence). exclude: an id never drawn (its
// logit read as -inf; unmask_step's mask token), or -1.
struct RowDraw {
  int64_t token = -1;
  float logprob = 0.0f;
  float confidence = -1.0f;
};

template <typename scalar_t>
RowDraw draw_row(const Params& p, int64_t b, const scalar_t* xr, const Philox4x32& words, bool want_confidence,
                 int64_t exclude, Workspace& ws) {
  const int64_t V = p.V;
  RowDraw d;
  float* v = ws.v.data();
  load_row(xr, V, v);
  if (p.penalties_on(b)) apply_penalties(p, b, v, ws);
  if (exclude >= 0) v[exclude] = neg_inf();
  const RowKnobs k = p.knobs(b);
  int64_t greedy_token = -1;
  if (k.greedy()) {
    float bv = neg_inf();
    for (int64_t i = 0; i < V; ++i) {
      if (v[i] > bv) {
        bv = v[i];
        greedy_token = i;
      }
    }
    d.token = greedy_token;
    d.logprob = greedy_token < 0 ? neg_inf() : 0.0f;
    if (!want_confidence || greedy_token < 0) return d;
  }
  const Selection s = select_row(k, k.greedy() ? 1.0f : k.temperature, V, ws);
  if (s.mode == kEmpty) {
    d.token = -1;
    d.logprob = neg_inf();
    return d;
  }
  uint64_t z = 0;
  for_each(s, ws, V, [&](uint32_t i) {
    if (s.kept(ws, i)) z += mass_of(ws.e[i]);
  });
  if (greedy_token >= 0) {  // the argmax is always kept (its value is the largest, 0)
    d.confidence = unmask_confidence(mass_of(ws.e[greedy_token]), z);
    return d;
  }
  const uint64_t target = draw_target(z, words);
  int64_t token = -1;
  uint64_t cum = 0, mass = 0;
  auto visit = [&](uint32_t i) {
    if (!s.kept(ws, i)) return false;
    mass = mass_of(ws.e[i]);
    cum += mass;
    if (cum > target) {
      token = i;
      return true;
    }
    return false;
  };
  if (s.all) {
    for (int64_t i = 0; i < V; ++i) {
      if (visit(static_cast<uint32_t>(i))) break;
    }
  } else {
    for (uint32_t i : ws.cand) {
      if (visit(i)) break;
    }
  }
  d.token = token;
  d.logprob = token < 0 ? neg_inf() : logprob_of(v[token], s.max_value, z);
  if (want_confidence && token >= 0) d.confidence = unmask_confidence(mass, z);
  return d;
}

void init_workspace(Workspace& ws, int64_t V) {
  ws.v.resize(V);
  ws.e.resize(V);
  ws.key.resize(V);
}

template <typename scalar_t>
void sample_rows(const Params& p, const at::Tensor& logits, int64_t* tokens, float* logprobs) {
  const int64_t B = p.B, V = p.V;
  const scalar_t* x = logits.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Workspace ws;
    init_workspace(ws, V);
    for (int64_t b = b0; b < b1; ++b) {
      const RowDraw d = draw_row(p, b, x + b * V, p.words(b, kSampleOffset), false, -1, ws);
      tokens[b] = d.token;
      logprobs[b] = d.logprob;
    }
  });
}

template <typename scalar_t>
void filter_rows(const Params& p, const at::Tensor& logits, at::Tensor& out) {
  const int64_t B = p.B, V = p.V;
  const scalar_t* x = logits.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t minus_inf = static_cast<scalar_t>(neg_inf());
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Workspace ws;
    ws.v.resize(V);
    ws.e.resize(V);
    ws.key.resize(V);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* xr = x + b * V;
      scalar_t* orow = o + b * V;
      load_row(xr, V, ws.v.data());
      const Selection s = select_row(p.knobs(b), 1.0f, V, ws);
      if (s.mode == kEmpty) {
        std::fill(orow, orow + V, minus_inf);
        continue;
      }
      if (s.all) {
        for (int64_t i = 0; i < V; ++i) {
          const bool keep = s.kept(ws, static_cast<uint32_t>(i)) && filter_passes(static_cast<float>(xr[i]), s.mode);
          orow[i] = keep ? xr[i] : minus_inf;
        }
      } else {
        std::fill(orow, orow + V, minus_inf);
        for (uint32_t i : ws.cand) {
          if (s.kept(ws, i) && filter_passes(static_cast<float>(xr[i]), s.mode)) orow[i] = xr[i];
        }
      }
    }
  });
}


// unmask_step, stage 1: a draw at every masked position (b, l), in parallel over positions.
template <typename scalar_t>
void unmask_draw_positions(const UnmaskInputs& u, const int64_t* tok, int64_t* drawn, float* confidence) {
  const Params& p = u.in.p;
  const int64_t L = u.L, V = p.V;
  const scalar_t* x = u.in.logits.data_ptr<scalar_t>();
  at::parallel_for(0, p.B * L, 1, [&](int64_t r0, int64_t r1) {
    Workspace ws;
    bool ready = false;
    for (int64_t r = r0; r < r1; ++r) {
      drawn[r] = -1;
      confidence[r] = -1.0f;
      if (tok[r] != u.mask_id) continue;
      if (!ready) {
        init_workspace(ws, V);
        ready = true;
      }
      const int64_t b = r / L, l = r % L;
      const RowDraw d = draw_row(p, b, x + b * u.stride_b + l * u.stride_l,
                                 p.words(b, kUnmaskOffset, static_cast<uint32_t>(l)), true, u.mask_id, ws);
      drawn[r] = d.token;
      confidence[r] = d.confidence;
    }
  });
}

// unmask_step, stage 2: per row, reveal the masked positions with the num_reveal smallest
// (key, position) pairs (a partial sort, O(L log n)).
void unmask_select_rows(const UnmaskInputs& u, const int64_t* tok, const int64_t* drawn, const float* confidence,
                        int64_t* out) {
  const Params& p = u.in.p;
  const int64_t L = u.L;
  const int64_t* nrows = u.num_reveal.defined() ? u.num_reveal.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<uint64_t, int64_t>> order;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* trow = tok + b * L;
      int64_t* orow = out + b * L;
      order.clear();
      for (int64_t l = 0; l < L; ++l) {
        orow[l] = trow[l];
        if (trow[l] != u.mask_id) continue;
        const int64_t r = b * L + l;
        const Philox4x32 w = u.strategy == kRandom ? p.words(b, kRevealOffset, static_cast<uint32_t>(l)) : Philox4x32{};
        order.emplace_back(reveal_key(u.strategy, drawn[r], confidence[r], w), l);
      }
      const int64_t n = reveal_count(nrows ? nrows[b] : u.num_reveal_value, static_cast<int64_t>(order.size()));
      if (n == 0) continue;
      auto before = [](const std::pair<uint64_t, int64_t>& a, const std::pair<uint64_t, int64_t>& c) {
        return reveal_before(a.first, a.second, c.first, c.second);
      };
      std::partial_sort(order.begin(), order.begin() + n, order.end(), before);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t l = order[j].second;
        const int64_t t = drawn[b * L + l];
        if (t >= 0) orow[l] = t;
      }
    }
  });
}


template <typename scalar_t>
void speculative_rows(const SpecInputs& s, int64_t* out, int64_t* accepted) {
  const int64_t n = s.n, V = s.V;
  const scalar_t* draft = s.draft.data_ptr<scalar_t>();
  const scalar_t* target = s.target.data_ptr<scalar_t>();
  const int64_t* ids = s.ids.data_ptr<int64_t>();
  at::parallel_for(0, s.B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* dp = draft + b * n * V;
      const scalar_t* tp = target + b * (n + 1) * V;
      int64_t* orow = out + b * (n + 1);
      const int64_t j = accept_walk<scalar_t>(s.p, b, n, V, ids + b * n, dp, tp, orow);
      accepted[b] = j;
      // Correction from max(0, target - draft) at the rejected position, or the bonus token
      // from the target at position n; a residual of zero mass falls back to the target.
      const scalar_t* t = tp + j * V;
      const scalar_t* q = j < n ? dp + j * V : nullptr;
      auto mass_at = [&](int64_t i, bool residual) {
        return residual ? residual_mass(static_cast<float>(t[i]), static_cast<float>(q[i]))
                        : prob_mass(static_cast<float>(t[i]));
      };
      bool residual = q != nullptr;
      uint64_t z = 0;
      for (int64_t i = 0; i < V; ++i) z += mass_at(i, residual);
      if (z == 0 && residual) {
        residual = false;
        for (int64_t i = 0; i < V; ++i) z += mass_at(i, false);
      }
      int64_t token = -1;
      if (z > 0) {
        const Philox4x32 w = s.p.words(b, kSpeculativeOffset, static_cast<uint32_t>(j));
        const uint64_t goal = draw_target_words(z, w.v[2], w.v[3]);
        uint64_t cum = 0;
        for (int64_t i = 0; i < V; ++i) {
          cum += mass_at(i, residual);
          if (cum > goal) {
            token = i;
            break;
          }
        }
      }
      orow[j] = token;
      for (int64_t r = j + 1; r <= n; ++r) orow[r] = -1;
    }
  });
}

struct CpuBackend {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
  static constexpr bool kReadsHostValues = true;

  static void sample(const Inputs& in, at::Tensor& tokens, at::Tensor& logprobs) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "sample_cpu", [&] {
      sample_rows<scalar_t>(in.p, in.logits, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
    });
  }

  static void filter(const Inputs& in, at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "top_k_top_p_filter_cpu",
                                    [&] { filter_rows<scalar_t>(in.p, in.logits, out); });
  }

  static void speculative(const SpecInputs& s, at::Tensor& out, at::Tensor& accepted) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.draft.scalar_type(), "speculative_accept_cpu", [&] {
      speculative_rows<scalar_t>(s, out.data_ptr<int64_t>(), accepted.data_ptr<int64_t>());
    });
  }

  static void unmask(const UnmaskInputs& u, at::Tensor& out, at::Tensor& drawn, at::Tensor& confidence) {
    const int64_t* tok = u.tokens.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.in.logits.scalar_type(), "unmask_step_cpu", [&] {
      unmask_draw_positions<scalar_t>(u, tok, drawn.data_ptr<int64_t>(), confidence.data_ptr<float>());
    });
    unmask_select_rows(u, tok, drawn.data_ptr<int64_t>(), confidence.data_ptr<float>(), out.data_ptr<int64_t>());
  }
};


}  // namespace

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) {
  m.impl("sample", &sampling::sample_host<CpuBackend>);
  m.impl("top_k_top_p_filter", &sampling::top_k_top_p_filter_host<CpuBackend>);
  m.impl("speculative_accept", &sampling::speculative_accept_host<CpuBackend>);
  m.impl("unmask_step", &sampling::unmask_step_host<CpuBackend>);
}

}  // namespace pk

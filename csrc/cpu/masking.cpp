// CPU kernels of the MLM masking family: mlm_mask (Bernoulli / exact-count selection,
// optional whole-word units, 80/10/10 actions) and span_mask (SpanBERT spans).
//
// One pass per row, rows in parallel (at::parallel_for). Every decision comes from the
// shared per-token functions in csrc/common/masking.h keyed by (seed, row, position), so
// the thread count never changes the result and the CUDA kernels reproduce it exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common/masking.h"
#include "../common/masking_checks.h"
#include "cpu_isa.h"

namespace pk {
namespace {

using masking::MaskParams;

// The common case (token units, Bernoulli selection) in blocks of 64 tokens: one
// vectorised pass computes the 16 Philox blocks that hold their selection words, then
// scalar work only for the ~15% selected tokens. Compiled for AVX-512, AVX2 and baseline
// x86-64, picked at run time by the CPU dispatch of csrc/cpu/cpu_isa.h.
constexpr int kBlocks = 16;
constexpr int kTokens = 4 * kBlocks;

template <typename id_t>
__attribute__((always_inline)) inline void bernoulli_row_body(const MaskParams& p, const id_t* row, const bool* arow,
                                                              id_t* orow, id_t* lrow, int64_t L, int64_t b, float pr) {
  const uint32_t key0 = static_cast<uint32_t>(p.seed), key1 = static_cast<uint32_t>(p.seed >> 32);
  // Selection on the raw word: uniform_float(w) < pr  <=>  (w >> 8) < ceil(pr * 2^24).
  const uint32_t thresh = pr >= 1.0f ? (1u << 24) : static_cast<uint32_t>(std::ceil(pr * 16777216.0f));
  uint32_t w[4][kBlocks];
  for (int64_t l0 = 0; l0 < L; l0 += kTokens) {
    const int n = static_cast<int>(std::min<int64_t>(kTokens, L - l0));
    philox4x32_10_block<kBlocks>(static_cast<uint32_t>(l0 >> 2), static_cast<uint32_t>(b), masking::kMaskOffset, 0,
                                 key0, key1, w);
    for (int i = 0; i < n; ++i) {
      const int64_t l = l0 + i;
      const bool selected =
          (w[i & 3][i >> 2] >> 8) < thresh && masking::eligible(p, static_cast<int64_t>(row[l]), !arow || arow[l]);
      masking::write_token(p, selected, row[l], b, l, orow + l, lrow + l);
    }
  }
}

#if PK_X86
template <typename id_t>
PK_TARGET_AVX512 void bernoulli_row_avx512(const MaskParams& p, const id_t* row, const bool* arow, id_t* orow, id_t* lrow,
                                           int64_t L, int64_t b, float pr) {
  bernoulli_row_body(p, row, arow, orow, lrow, L, b, pr);
}
template <typename id_t>
PK_TARGET_AVX2 void bernoulli_row_avx2(const MaskParams& p, const id_t* row, const bool* arow, id_t* orow, id_t* lrow,
                                       int64_t L, int64_t b, float pr) {
  bernoulli_row_body(p, row, arow, orow, lrow, L, b, pr);
}
#endif

template <typename id_t>
void bernoulli_row(const MaskParams& p, const id_t* row, const bool* arow, id_t* orow, id_t* lrow, int64_t L, int64_t b,
                   float pr) {
#if PK_X86
  if (cpu::has_isa(cpu::Isa::kAvx512)) return bernoulli_row_avx512(p, row, arow, orow, lrow, L, b, pr);
  if (cpu::has_isa(cpu::Isa::kAvx2)) return bernoulli_row_avx2(p, row, arow, orow, lrow, L, b, pr);
#endif
  bernoulli_row_body(p, row, arow, orow, lrow, L, b, pr);
}

template <typename id_t>
void mlm_mask_rows(const MaskParams& p, const masking::CheckedInputs& c, double prob, bool exact_count,
                   int64_t max_predictions, at::Tensor& out, at::Tensor& labels) {
  const int64_t B = c.ids.size(0), L = c.ids.size(1);
  const id_t* ids = c.ids.data_ptr<id_t>();
  const bool* attn = c.attn.defined() ? c.attn.data_ptr<bool>() : nullptr;
  const bool* ws = c.word_starts.defined() ? c.word_starts.data_ptr<bool>() : nullptr;
  const float* prob_rows = c.prob_rows.defined() ? c.prob_rows.data_ptr<float>() : nullptr;
  id_t* o = out.data_ptr<id_t>();
  id_t* lab = labels.data_ptr<id_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> keys;
    std::vector<int64_t> unit_of;  // selection unit (word start or the token itself)
    for (int64_t b = b0; b < b1; ++b) {
      const id_t* row = ids + b * L;
      const bool* arow = attn ? attn + b * L : nullptr;
      const bool* wrow = ws ? ws + b * L : nullptr;
      id_t* orow = o + b * L;
      id_t* lrow = lab + b * L;
      const double prd = prob_rows ? static_cast<double>(masking::row_rate(prob_rows[b])) : prob;
      const float pr = static_cast<float>(prd);
      if (!exact_count && !wrow) {
        bernoulli_row<id_t>(p, row, arow, orow, lrow, L, b, pr);
        continue;
      }
      const auto elig = [&](int64_t l) { return masking::eligible(p, static_cast<int64_t>(row[l]), !arow || arow[l]); };
      unit_of.resize(L);
      int64_t current = 0;
      for (int64_t l = 0; l < L; ++l) {
        if (!wrow || l == 0 || wrow[l]) current = l;
        unit_of[l] = current;
      }
      // Threshold on the unit keys for exact counts: a unit is selected iff key <= threshold.
      uint64_t threshold = 0;
      bool any = false;
      if (exact_count) {
        keys.clear();
        for (int64_t l = 0; l < L; ++l) {
          if (unit_of[l] != l || !elig(l)) continue;
          keys.push_back(masking::exact_key(masking::selection_word(p.seed, b, l), l));
        }
        const int64_t k = prd > 0.0 ? masking::exact_budget(prd, static_cast<int64_t>(keys.size()), max_predictions) : 0;
        if (k > 0) {
          std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end());
          threshold = keys[k - 1];
          any = true;
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        bool selected = false;
        if (elig(l)) {
          const int64_t u = unit_of[l];
          if (u == l || elig(u)) {
            const uint32_t wu = masking::selection_word(p.seed, b, u);
            selected = exact_count ? (any && masking::exact_key(wu, u) <= threshold) : (uniform_float(wu) < pr);
          }
        }
        masking::write_token(p, selected, row[l], b, l, orow + l, lrow + l);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mlm_mask_cpu(const at::Tensor& input_ids,
                                                const c10::optional<at::Tensor>& attention_mask,
                                                const c10::optional<at::Tensor>& special_ids,
                                                const c10::optional<at::Tensor>& word_starts,
                                                const c10::optional<at::Tensor>& mask_prob_rows, const at::Tensor& seed,
                                                double mask_prob, int64_t mask_token_id, int64_t vocab_size,
                                                double replace_prob, double random_prob, bool exact_count,
                                                int64_t max_predictions) {
  auto c = masking::check_inputs(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed,
                                 mask_token_id, vocab_size, mask_prob, replace_prob, random_prob);
  auto out = at::empty_like(c.ids);
  auto labels = at::empty_like(c.ids);
  if (c.ids.numel() == 0) return {out, labels};
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  MaskParams p = masking::make_params(c, mask_token_id, vocab_size, replace_prob, random_prob);
  p.seed = s;
  AT_DISPATCH_INDEX_TYPES(c.ids.scalar_type(), "mlm_mask_cpu", [&] {
    mlm_mask_rows<index_t>(p, c, mask_prob, exact_count, max_predictions, out, labels);
  });
  return {out, labels};
}

std::tuple<at::Tensor, at::Tensor> span_mask_cpu(const at::Tensor& input_ids,
                                                 const c10::optional<at::Tensor>& attention_mask,
                                                 const c10::optional<at::Tensor>& special_ids,
                                                 const c10::optional<at::Tensor>& word_starts,
                                                 const c10::optional<at::Tensor>& mask_prob_rows,
                                                 const at::Tensor& seed, double mask_prob, int64_t mask_token_id,
                                                 int64_t vocab_size, double replace_prob, double random_prob,
                                                 double geometric_p, int64_t max_span) {
  auto c = masking::check_inputs(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed,
                                 mask_token_id, vocab_size, mask_prob, replace_prob, random_prob);
  const int64_t span_cap = masking::check_span_args(geometric_p, max_span, c.ids.size(1));
  auto out = c.ids.clone();
  auto labels = at::full_like(c.ids, -100);
  if (c.ids.numel() == 0) return {out, labels};
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  MaskParams p = masking::make_params(c, mask_token_id, vocab_size, replace_prob, random_prob);
  p.seed = s;
  const int64_t B = c.ids.size(0), L = c.ids.size(1);
  AT_DISPATCH_INDEX_TYPES(c.ids.scalar_type(), "span_mask_cpu", [&] {
    const index_t* ids = c.ids.data_ptr<index_t>();
    const bool* attn = c.attn.defined() ? c.attn.data_ptr<bool>() : nullptr;
    const bool* ws = c.word_starts.defined() ? c.word_starts.data_ptr<bool>() : nullptr;
    const float* prob_rows = c.prob_rows.defined() ? c.prob_rows.data_ptr<float>() : nullptr;
    index_t* o = out.data_ptr<index_t>();
    index_t* lab = labels.data_ptr<index_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        masking::span_mask_row<index_t, index_t, bool>(
            p, ids + b * L, attn ? attn + b * L : nullptr, ws ? ws + b * L : nullptr, o + b * L, lab + b * L, L, b,
            prob_rows ? static_cast<double>(masking::row_rate(prob_rows[b])) : mask_prob, static_cast<float>(geometric_p),
            span_cap);
      }
    });
  });
  return {out, labels};
}

}  // namespace

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) {
  m.impl("mlm_mask", &mlm_mask_cpu);
  m.impl("span_mask", &span_mask_cpu);
}

}  // namespace pk

// Host-side argument checks shared by the CPU and CUDA entry points of the masking ops.
// The Python wrappers check the same things with friendlier messages; these keep direct
// calls of torch.ops.pretrain_kernels.* from ever reading out of bounds.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "masking.h"

namespace pk {
namespace masking {

struct CheckedInputs {
  at::Tensor ids, attn, special, word_starts, prob_rows;
};

inline CheckedInputs check_inputs(const at::Tensor& input_ids, const c10::optional<at::Tensor>& attention_mask,
                                  const c10::optional<at::Tensor>& special_ids,
                                  const c10::optional<at::Tensor>& word_starts,
                                  const c10::optional<at::Tensor>& mask_prob_rows, const at::Tensor& seed,
                                  int64_t mask_token_id, int64_t vocab_size, double mask_prob, double replace_prob,
                                  double random_prob, bool native_attn = false) {
  TORCH_CHECK(mask_prob >= 0.0 && mask_prob <= 1.0, "mask_prob: expected a probability in [0, 1], got ", mask_prob);
  TORCH_CHECK(input_ids.dim() == 2, "input_ids: expected a 2-D tensor [batch, seq_len], got ", input_ids.dim(),
              "-D");
  TORCH_CHECK(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt,
              "input_ids: expected int32 or int64, got ", input_ids.scalar_type());
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= (int64_t(1) << 32) - 1, "vocab_size: expected 1 <= vocab_size < 2^32, got ",
              vocab_size);
  // int32 ids cannot hold the mask token or a random replacement at or above 2^31
  TORCH_CHECK(input_ids.scalar_type() == at::kLong || vocab_size <= (int64_t(1) << 31),
              "vocab_size: int32 input_ids hold ids below 2^31, got vocab_size ", vocab_size,
              " (pass int64 input_ids)");
  TORCH_CHECK(mask_token_id >= 0 && mask_token_id < vocab_size, "mask_token_id: expected an id in [0, ", vocab_size,
              "), got ", mask_token_id);
  TORCH_CHECK(replace_prob >= 0 && random_prob >= 0 && replace_prob + random_prob <= 1.0 + 1e-9,
              "replace_prob/random_prob: expected non-negative with replace_prob + random_prob <= 1, got ",
              replace_prob, " and ", random_prob);
  TORCH_CHECK(input_ids.size(1) < (int64_t(1) << 31), "input_ids: seq_len must be below 2^31");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "seed: expected a one-element int64 tensor, got ",
              seed.scalar_type(), " of shape ", seed.sizes());
  TORCH_CHECK(seed.device().is_cpu() || seed.device() == input_ids.device(),
              "seed: expected a CPU tensor or one on ", input_ids.device(), ", got ", seed.device());
  const auto B = input_ids.size(0), L = input_ids.size(1);
  CheckedInputs c;
  c.ids = input_ids.contiguous();
  if (attention_mask.has_value()) {
    const auto& a = *attention_mask;
    TORCH_CHECK(a.sizes() == input_ids.sizes(), "attention_mask: expected shape ", input_ids.sizes(), ", got ",
                a.sizes());
    TORCH_CHECK(a.device() == input_ids.device(), "attention_mask: expected device ", input_ids.device(), ", got ",
                a.device());
    // bool, or (native_attn: a kernel that reads them as they are) uint8 / int32 / int64; any
    // other dtype becomes bool (!= 0)
    const auto t = a.scalar_type();
    const bool keep = t == at::kBool || (native_attn && (t == at::kByte || t == at::kInt || t == at::kLong));
    c.attn = (keep ? a : a.ne(0)).contiguous();
  }
  if (special_ids.has_value()) {
    const auto& s = *special_ids;
    TORCH_CHECK(s.dim() == 1, "special_ids: expected a 1-D tensor, got ", s.dim(), "-D");
    TORCH_CHECK(s.device() == input_ids.device(), "special_ids: expected device ", input_ids.device(), ", got ",
                s.device());
    TORCH_CHECK(!at::isFloatingType(s.scalar_type()) && s.scalar_type() != at::kBool,
                "special_ids: expected an integer tensor, got ", s.scalar_type());
    // Sorted ascending, as the wrappers pass it (sorting here would cost a device sort per call).
    // Only ids on the host can be checked: on CUDA an unsorted tensor stays in bounds (binary
    // search over n_special ids) but may miss special ids, as malformed cu_seqlens are clamped.
    c.special = s.to(at::kLong).contiguous();
    if (c.special.device().is_cpu()) {
      const int64_t* sp = c.special.data_ptr<int64_t>();
      for (int64_t i = 1; i < c.special.numel(); ++i) {
        TORCH_CHECK(sp[i - 1] <= sp[i], "special_ids: expected ids sorted in ascending order");
      }
    }
  }
  if (word_starts.has_value()) {
    const auto& w = *word_starts;
    TORCH_CHECK(w.sizes() == input_ids.sizes(), "word_starts: expected shape ", input_ids.sizes(), ", got ",
                w.sizes());
    TORCH_CHECK(w.device() == input_ids.device(), "word_starts: expected device ", input_ids.device(), ", got ",
                w.device());
    c.word_starts = (w.scalar_type() == at::kBool ? w : w.ne(0)).contiguous();
  }
  if (mask_prob_rows.has_value()) {
    const auto& m = *mask_prob_rows;
    TORCH_CHECK(m.dim() == 1 && m.size(0) == B, "mask_prob: expected a per-row tensor of shape [", B, "], got ",
                m.sizes());
    TORCH_CHECK(m.device() == input_ids.device(), "mask_prob: expected device ", input_ids.device(), ", got ",
                m.device());
    TORCH_CHECK(at::isFloatingType(m.scalar_type()), "mask_prob: expected a float tensor of per-row rates, got ",
                m.scalar_type());
    c.prob_rows = m.to(at::kFloat).contiguous();
  }
  (void)L;
  return c;
}

// The kernel parameters both backends start from. The seed is the backend's business (a CPU
// value, or read on the device); n_allowed needs the special ids, so it is counted here when
// they are on the host and by the CUDA kernels otherwise.
inline MaskParams make_params(const CheckedInputs& c, int64_t mask_token_id, int64_t vocab_size, double replace_prob,
                          double random_prob) {
  MaskParams p;
  p.mask_token_id = mask_token_id;
  p.vocab_size = vocab_size;
  p.replace_prob = static_cast<float>(replace_prob);
  p.random_prob = static_cast<float>(random_prob);
  p.seed = 0;
  p.special = c.special.defined() ? c.special.data_ptr<int64_t>() : nullptr;
  p.n_special = c.special.defined() ? c.special.numel() : 0;
  p.n_allowed = c.special.defined() && !c.special.is_cpu()
                    ? 0
                    : vocab_size - count_specials_in_vocab(p.special, p.n_special, vocab_size);
  return p;
}

// Returns max_span as the kernels use it: a span never covers more units than the row has
// tokens, so any larger value means the same (and stays exact in every integer type).
inline int64_t check_span_args(double geometric_p, int64_t max_span, int64_t seq_len) {
  TORCH_CHECK(geometric_p > 0.0 && geometric_p <= 1.0, "geometric_p: expected a probability in (0, 1], got ",
              geometric_p);
  TORCH_CHECK(max_span >= 1, "max_span: expected >= 1, got ", max_span);
  return std::min<int64_t>(max_span, std::max<int64_t>(seq_len, 1));
}

}  // namespace masking
}  // namespace pk

// Host-side argument checks of the sampling ops, shared by the CPU and CUDA entry points,
// and the packing of the checked tensors into sampling::Params. The Python wrappers check
// the same things first with friendlier messages; these keep direct calls of
// torch.ops.pretrain_kernels.* from reading out of bounds.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <string>

#include "sampling.h"

namespace pk {
namespace sampling {

struct Inputs {
  at::Tensor logits;  // [B, V] contiguous, float32 / float16 / bfloat16 / float64
  at::Tensor prev;    // [B, T] int64 contiguous, or undefined
  at::Tensor temperature, top_k, top_p, min_p, repetition, presence, frequency;  // [B] or undefined
  at::Tensor seed;    // int64 [1] or [B]
  Params p;
};

inline void check_logits(const at::Tensor& logits, const char* name = "logits") {
  TORCH_CHECK(logits.dim() == 2, name, ": expected a 2-D tensor [batch, vocab], got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, name,
              ": expected float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(logits.size(1) <= kMaxVocab, name, ": vocabularies up to 2^27 entries are supported, got ",
              logits.size(1));
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, name, ": the vocabulary dimension is empty");
}

// A checked float knob as float32 without a change of meaning: finite values beyond the
// float32 range saturate to +-FLT_MAX and non-zero values below its smallest subnormal go to
// +-that subnormal (a plain cast makes 1e300 +inf and 1e-300 0, which the kernels read as
// "off" for the penalties, "greedy" for a temperature, "invalid" for top_p). +-inf and NaN
// stay. The same rule for Python-number knobs and float64 per-row tensors.
constexpr double kFloatMax = static_cast<double>(std::numeric_limits<float>::max());
constexpr double kFloatTiny = static_cast<double>(std::numeric_limits<float>::denorm_min());
inline float knob_float(double v) {
  if (std::isfinite(v)) {
    if (v > kFloatMax) return std::numeric_limits<float>::max();
    if (v < -kFloatMax) return -std::numeric_limits<float>::max();
    if (v != 0.0 && std::fabs(v) < kFloatTiny) v = std::copysign(kFloatTiny, v);
  }
  return static_cast<float>(v);
}
inline at::Tensor knob_float_tensor(const at::Tensor& x) {
  if (x.scalar_type() != at::kDouble) return x.to(at::kFloat);
  // knob_float elementwise, with tensor ops (no host sync)
  at::Tensor c = at::where(x.isfinite(), x.clamp(-kFloatMax, kFloatMax), x);
  const at::Tensor tiny = (c != 0) & (c.abs() < kFloatTiny);
  c = at::where(tiny, c.sign() * kFloatTiny, c);
  return c.to(at::kFloat);
}

inline at::Tensor row_tensor(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& logits,
                             bool integer) {
  if (!t.has_value()) return at::Tensor();
  const auto& x = *t;
  const int64_t B = logits.size(0);
  TORCH_CHECK(x.dim() == 1 && x.size(0) == B, name, ": expected a per-row tensor of shape [", B, "], got ",
              x.sizes());
  TORCH_CHECK(x.device() == logits.device(), name, ": expected device ", logits.device(), ", got ", x.device());
  if (integer) {
    TORCH_CHECK(!at::isFloatingType(x.scalar_type()) && x.scalar_type() != at::kBool && !x.is_complex(), name,
                ": expected an integer tensor, got ", x.scalar_type());
    return x.to(at::kLong).contiguous();
  }
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, ": expected a floating-point tensor, got ",
              x.scalar_type());
  return knob_float_tensor(x).contiguous();
}

// Seeds: one int64 element, or one per row ([B], B > 1) on the logits' device. A single seed
// on the CPU is read on the host (no device sync); one on the device is read by the kernel.
inline void set_seed(Params& p, at::Tensor& keep, const at::Tensor& seed, const at::Tensor& like, int64_t B) {
  TORCH_CHECK(seed.scalar_type() == at::kLong, "seed: expected an int64 tensor, got ", seed.scalar_type());
  TORCH_CHECK(seed.dim() <= 1 && (seed.numel() == 1 || (B > 1 && seed.numel() == B)),
              "seed: expected one element or one per row [", B, "], got shape ", seed.sizes());
  p.per_row_seed = seed.numel() > 1;
  if (!p.per_row_seed && seed.device().is_cpu()) {
    p.seed = static_cast<uint64_t>(seed.item<int64_t>());
    p.seed_ptr = nullptr;
    return;
  }
  TORCH_CHECK(seed.device() == like.device(), "seed: expected ", p.per_row_seed ? "per-row seeds" : "a seed",
              " on ", like.device(), (p.per_row_seed ? "" : " or the CPU"), ", got ", seed.device());
  keep = seed.contiguous();
  p.seed_ptr = keep.data_ptr<int64_t>();
}

inline void check_knob_scalars(double temperature, int64_t top_k, double top_p, double min_p, double repetition,
                               double presence, double frequency) {
  TORCH_CHECK(temperature >= 0.0, "temperature: expected >= 0 (0 means greedy), got ", temperature);
  TORCH_CHECK(top_k >= 0, "top_k: expected >= 0 (0 means off), got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "top_p: expected a value in (0, 1], got ", top_p);
  TORCH_CHECK(min_p >= 0.0 && min_p <= 1.0, "min_p: expected a value in [0, 1], got ", min_p);
  TORCH_CHECK(repetition > 0.0 && std::isfinite(repetition), "repetition_penalty: expected a finite value > 0, got ",
              repetition);
  TORCH_CHECK(std::isfinite(presence), "presence_penalty: expected a finite value, got ", presence);
  TORCH_CHECK(std::isfinite(frequency), "frequency_penalty: expected a finite value, got ", frequency);
}

// Value checks of per-row knobs; only where reading them costs no device sync (CPU).
inline void check_knob_rows(const Inputs& in) {
  const int64_t B = in.logits.size(0);
  auto each = [&](const at::Tensor& t, const char* name, const char* expect, auto ok) {
    if (!t.defined()) return;
    for (int64_t b = 0; b < B; ++b) {
      if (!ok(b)) {
        if (t.scalar_type() == at::kLong) {
          TORCH_CHECK(false, name, ": expected ", expect, ", got ", t.data_ptr<int64_t>()[b], " in row ", b);
        }
        TORCH_CHECK(false, name, ": expected ", expect, ", got ", t.data_ptr<float>()[b], " in row ", b);
      }
    }
  };
  const Params& p = in.p;
  each(in.temperature, "temperature", ">= 0 (0 means greedy)", [&](int64_t b) { return p.temperature_rows[b] >= 0.0f; });
  each(in.top_k, "top_k", ">= 0 (0 means off)", [&](int64_t b) { return p.top_k_rows[b] >= 0; });
  each(in.top_p, "top_p", "a value in (0, 1]", [&](int64_t b) { return p.top_p_rows[b] > 0.0f && p.top_p_rows[b] <= 1.0f; });
  each(in.min_p, "min_p", "a value in [0, 1]", [&](int64_t b) { return p.min_p_rows[b] >= 0.0f && p.min_p_rows[b] <= 1.0f; });
  each(in.repetition, "repetition_penalty", "a finite value > 0",
       [&](int64_t b) { return p.repetition_rows[b] > 0.0f && std::isfinite(p.repetition_rows[b]); });
  each(in.presence, "presence_penalty", "a finite value", [&](int64_t b) { return std::isfinite(p.presence_rows[b]); });
  each(in.frequency, "frequency_penalty", "a finite value",
       [&](int64_t b) { return std::isfinite(p.frequency_rows[b]); });
}

// The knobs of pk.sample as the ops take them (sample, unmask_step; csrc/ops.cpp): a per-row
// tensor [B] or none, and the number used when there is none. The entry points of
// sampling_ops.h fill it from their arguments; it refers to them, so it lives only as long as
// the call.
struct KnobArgs {
  const c10::optional<at::Tensor>& temperature_rows;
  const c10::optional<at::Tensor>& top_k_rows;
  const c10::optional<at::Tensor>& top_p_rows;
  const c10::optional<at::Tensor>& min_p_rows;
  const c10::optional<at::Tensor>& repetition_rows;
  const c10::optional<at::Tensor>& presence_rows;
  const c10::optional<at::Tensor>& frequency_rows;
  double temperature;
  int64_t top_k;
  double top_p, min_p, repetition, presence, frequency;
};

// The knobs, prev_tokens and seed of pk.sample's draw for logits [B, ..., V] (sample and
// unmask_step): checked and packed into in.p (B, V, per-row pointers, scalars, seed).
inline void set_sample_knobs(Inputs& in, const at::Tensor& logits, const c10::optional<at::Tensor>& prev_tokens,
                             const at::Tensor& seed, const KnobArgs& k) {
  check_knob_scalars(k.temperature, k.top_k, k.top_p, k.min_p, k.repetition, k.presence, k.frequency);
  const int64_t B = logits.size(0), V = logits.size(-1);
  Params& p = in.p;
  p.B = B;
  p.V = V;
  in.temperature = row_tensor(k.temperature_rows, "temperature", logits, false);
  in.top_k = row_tensor(k.top_k_rows, "top_k", logits, true);
  in.top_p = row_tensor(k.top_p_rows, "top_p", logits, false);
  in.min_p = row_tensor(k.min_p_rows, "min_p", logits, false);
  in.repetition = row_tensor(k.repetition_rows, "repetition_penalty", logits, false);
  in.presence = row_tensor(k.presence_rows, "presence_penalty", logits, false);
  in.frequency = row_tensor(k.frequency_rows, "frequency_penalty", logits, false);
  p.temperature_rows = in.temperature.defined() ? in.temperature.data_ptr<float>() : nullptr;
  p.top_k_rows = in.top_k.defined() ? in.top_k.data_ptr<int64_t>() : nullptr;
  p.top_p_rows = in.top_p.defined() ? in.top_p.data_ptr<float>() : nullptr;
  p.min_p_rows = in.min_p.defined() ? in.min_p.data_ptr<float>() : nullptr;
  p.repetition_rows = in.repetition.defined() ? in.repetition.data_ptr<float>() : nullptr;
  p.presence_rows = in.presence.defined() ? in.presence.data_ptr<float>() : nullptr;
  p.frequency_rows = in.frequency.defined() ? in.frequency.data_ptr<float>() : nullptr;
  p.temperature = knob_float(k.temperature);
  p.top_k = k.top_k;
  p.top_p = knob_float(k.top_p);
  p.min_p = knob_float(k.min_p);
  p.repetition = knob_float(k.repetition);
  p.presence = knob_float(k.presence);
  p.frequency = knob_float(k.frequency);
  if (prev_tokens.has_value()) {
    const auto& t = *prev_tokens;
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B, "prev_tokens: expected shape [", B, ", n] (batch of logits), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
                "prev_tokens: expected int32 or int64 ids, got ", t.scalar_type());
    TORCH_CHECK(t.device() == logits.device(), "prev_tokens: expected device ", logits.device(), ", got ",
                t.device());
    in.prev = t.to(at::kLong).contiguous();
    p.prev = in.prev.data_ptr<int64_t>();
    p.T = t.size(1);
  }
  set_seed(p, in.seed, seed, logits, B);
}

inline Inputs check_sample_inputs(const at::Tensor& logits, const c10::optional<at::Tensor>& prev_tokens,
                                  const at::Tensor& seed, const KnobArgs& knobs) {
  check_logits(logits);
  Inputs in;
  in.logits = logits.contiguous();
  set_sample_knobs(in, logits, prev_tokens, seed, knobs);
  return in;
}

inline Inputs check_filter_inputs(const at::Tensor& logits, const c10::optional<at::Tensor>& top_k_rows,
                                  const c10::optional<at::Tensor>& top_p_rows,
                                  const c10::optional<at::Tensor>& min_p_rows, int64_t top_k, double top_p,
                                  double min_p) {
  check_logits(logits);
  check_knob_scalars(1.0, top_k, top_p, min_p, 1.0, 0.0, 0.0);
  Inputs in;
  in.logits = logits.contiguous();
  Params& p = in.p;
  p.B = logits.size(0);
  p.V = logits.size(1);
  in.top_k = row_tensor(top_k_rows, "top_k", logits, true);
  in.top_p = row_tensor(top_p_rows, "top_p", logits, false);
  in.min_p = row_tensor(min_p_rows, "min_p", logits, false);
  p.top_k_rows = in.top_k.defined() ? in.top_k.data_ptr<int64_t>() : nullptr;
  p.top_p_rows = in.top_p.defined() ? in.top_p.data_ptr<float>() : nullptr;
  p.min_p_rows = in.min_p.defined() ? in.min_p.data_ptr<float>() : nullptr;
  p.temperature = 1.0f;
  p.top_k = top_k;
  p.top_p = knob_float(top_p);
  p.min_p = knob_float(min_p);
  return in;
}

struct SpecInputs {
  at::Tensor draft, ids, target, seed;
  int64_t B = 0, n = 0, V = 0;
  Params p;  // seed fields only
};

inline SpecInputs check_spec_inputs(const at::Tensor& draft_probs, const at::Tensor& draft_token_ids,
                                    const at::Tensor& target_probs, const at::Tensor& seed) {
  TORCH_CHECK(draft_probs.dim() == 3, "draft_probs: expected a 3-D tensor [batch, n, vocab], got ",
              draft_probs.dim(), "-D");
  const int64_t B = draft_probs.size(0), n = draft_probs.size(1), V = draft_probs.size(2);
  TORCH_CHECK(target_probs.dim() == 3 && target_probs.size(0) == B && target_probs.size(1) == n + 1 &&
                  target_probs.size(2) == V,
              "target_probs: expected shape [", B, ", ", n + 1, ", ", V, "] (one more position than draft_probs), got ",
              target_probs.sizes());
  TORCH_CHECK(draft_token_ids.dim() == 2 && draft_token_ids.size(0) == B && draft_token_ids.size(1) == n,
              "draft_token_ids: expected shape [", B, ", ", n, "], got ", draft_token_ids.sizes());
  for (const auto* t : {&draft_probs, &target_probs}) {
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                (t == &draft_probs ? "draft_probs" : "target_probs"),
                ": expected float32, float16, bfloat16 or float64, got ", dt);
  }
  TORCH_CHECK(draft_probs.scalar_type() == target_probs.scalar_type(), "target_probs: expected the dtype of draft_probs (",
              draft_probs.scalar_type(), "), got ", target_probs.scalar_type());
  TORCH_CHECK(draft_token_ids.scalar_type() == at::kLong || draft_token_ids.scalar_type() == at::kInt,
              "draft_token_ids: expected int32 or int64 ids, got ", draft_token_ids.scalar_type());
  TORCH_CHECK(target_probs.device() == draft_probs.device() && draft_token_ids.device() == draft_probs.device(),
              "target_probs, draft_token_ids: expected device ", draft_probs.device());
  TORCH_CHECK(V <= kMaxVocab, "draft_probs: vocabularies up to 2^27 entries are supported, got ", V);
  TORCH_CHECK(B == 0 || V > 0, "draft_probs: the vocabulary dimension is empty");
  SpecInputs s;
  s.draft = draft_probs.contiguous();
  s.target = target_probs.contiguous();
  s.ids = draft_token_ids.to(at::kLong).contiguous();
  s.B = B;
  s.n = n;
  s.V = V;
  s.p.B = B;
  s.p.V = V;
  set_seed(s.p, s.seed, seed, draft_probs, B);
  return s;
}

// unmask_step: logits [B, L, V] (unit stride over the vocabulary, else copied), tokens [B, L]
// int32/int64, num_reveal (a number, or per-row [B] integers), the strategy by name, plus the
// knobs of sample. The drawn tokens and the output are worked on as int64 [B, L].
struct UnmaskInputs {
  Inputs in;             // in.logits: the logits [B, L, V]; in.p: knobs and seed (B, V)
  at::Tensor tokens;     // [B, L] int64 contiguous
  at::Tensor num_reveal; // [B] int64, or undefined (then num_reveal_value)
  int64_t num_reveal_value = 0;
  int64_t L = 0, stride_b = 0, stride_l = 0;  // element strides of the logits rows
  int64_t mask_id = 0;
  int strategy = kConfidence;
};

// The arguments of unmask_step (csrc/ops.cpp) as its entry point, unmask_step_host of
// sampling_ops.h, receives them; like KnobArgs it refers to them.
struct UnmaskArgs {
  const at::Tensor& logits;
  const at::Tensor& tokens;
  const c10::optional<at::Tensor>& num_reveal_rows;
  const c10::optional<at::Tensor>& prev_tokens;
  const at::Tensor& seed;
  KnobArgs knobs;
  int64_t mask_token_id;
  int64_t num_reveal;
  c10::string_view strategy;
};

inline UnmaskInputs check_unmask_inputs(const UnmaskArgs& a) {
  const at::Tensor& logits = a.logits;
  const at::Tensor& tokens = a.tokens;
  const int64_t mask_token_id = a.mask_token_id, num_reveal = a.num_reveal;
  const c10::string_view strategy = a.strategy;
  TORCH_CHECK(logits.dim() == 3, "logits: expected a 3-D tensor [batch, length, vocab], got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              "logits: expected float32, float16, bfloat16 or float64, got ", dt);
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V <= kMaxVocab, "logits: vocabularies up to 2^27 entries are supported, got ", V);
  TORCH_CHECK(B * L == 0 || V > 0, "logits: the vocabulary dimension is empty");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == B && tokens.size(1) == L, "tokens: expected shape [", B, ", ",
              L, "] (the batch and length of logits), got ", tokens.sizes());
  TORCH_CHECK(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt,
              "tokens: expected int32 or int64 ids, got ", tokens.scalar_type());
  TORCH_CHECK(tokens.device() == logits.device(), "tokens: expected device ", logits.device(), ", got ",
              tokens.device());
  TORCH_CHECK(mask_token_id >= 0 && mask_token_id < V, "mask_token_id: expected an id in [0, ", V, "), got ",
              mask_token_id);
  TORCH_CHECK(num_reveal >= 0, "num_reveal: expected >= 0, got ", num_reveal);
  UnmaskInputs u;
  if (strategy == "confidence") {
    u.strategy = kConfidence;
  } else if (strategy == "random") {
    u.strategy = kRandom;
  } else {
    TORCH_CHECK(false, "strategy: expected \"confidence\" or \"random\", got \"", std::string(strategy), "\"");
  }
  u.in.logits = logits.stride(2) == 1 || V <= 1 ? logits : logits.contiguous();
  u.L = L;
  u.stride_b = u.in.logits.stride(0);
  u.stride_l = u.in.logits.stride(1);
  u.mask_id = mask_token_id;
  u.num_reveal_value = num_reveal;
  u.tokens = tokens.to(at::kLong).contiguous();
  if (a.num_reveal_rows.has_value()) {
    u.num_reveal = row_tensor(a.num_reveal_rows, "num_reveal", logits, true);
  }
  set_sample_knobs(u.in, logits, a.prev_tokens, a.seed, a.knobs);
  return u;
}

// Value checks that read per-row tensors: only where that costs no device sync (CPU).
inline void check_unmask_rows(const UnmaskInputs& u) {
  check_knob_rows(u.in);
  if (u.num_reveal.defined()) {
    const int64_t* n = u.num_reveal.data_ptr<int64_t>();
    for (int64_t b = 0; b < u.num_reveal.numel(); ++b) {
      TORCH_CHECK(n[b] >= 0, "num_reveal: expected >= 0, got ", n[b], " in row ", b);
    }
  }
}

}  // namespace sampling
}  // namespace pk

// Host side of the sampling family, shared by the CPU and CUDA entry points: the op
// signatures (one copy, matching csrc/ops.cpp's schemas; the checks of sampling_checks.h take
// them packed as KnobArgs / UnmaskArgs), the output allocations and the empty cases. A backend
// supplies:
//   Backend::Guard                          constructed from the first input's device (CUDA: the
//                                           device guard; CPU: nothing)
//   Backend::kReadsHostValues               true where per-row tensors can be read without a
//                                           device sync (CPU): then their values are checked too
//   Backend::sample(in, tokens, logprobs)   B > 0
//   Backend::filter(in, out)                numel > 0
//   Backend::speculative(s, out, accepted)  B > 0
//   Backend::unmask(u, out, drawn, confidence)  B * L > 0
// and registers the instantiations below, e.g. m.impl("sample", &sample_host<CpuBackend>).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "sampling_checks.h"

namespace pk {
namespace sampling {

// prev_tokens ids in [0, V) or -1 (none); host memory only.
inline void check_prev_range(const Params& p) {
  for (int64_t i = 0; i < p.B * p.T; ++i) {
    TORCH_CHECK(p.prev[i] >= -1 && p.prev[i] < p.V, "prev_tokens: expected ids in [0, ", p.V,
                ") or -1 (none), found ", p.prev[i], " at row ", i / p.T, ", position ", i % p.T);
  }
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> sample_host(
    const at::Tensor& logits, const c10::optional<at::Tensor>& prev_tokens, const at::Tensor& seed,
    const c10::optional<at::Tensor>& temperature_rows, const c10::optional<at::Tensor>& top_k_rows,
    const c10::optional<at::Tensor>& top_p_rows, const c10::optional<at::Tensor>& min_p_rows,
    const c10::optional<at::Tensor>& repetition_rows, const c10::optional<at::Tensor>& presence_rows,
    const c10::optional<at::Tensor>& frequency_rows, double temperature, int64_t top_k, double top_p, double min_p,
    double repetition, double presence, double frequency) {
  const typename Backend::Guard guard(logits.device());
  Inputs in = check_sample_inputs(logits, prev_tokens, seed,
                                  {temperature_rows, top_k_rows, top_p_rows, min_p_rows, repetition_rows,
                                   presence_rows, frequency_rows, temperature, top_k, top_p, min_p, repetition,
                                   presence, frequency});
  if constexpr (Backend::kReadsHostValues) {
    check_knob_rows(in);
    if (in.prev.defined()) check_prev_range(in.p);
  }
  const int64_t B = in.p.B;
  auto tokens = at::empty({B}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  if (B > 0) Backend::sample(in, tokens, logprobs);
  return {tokens, logprobs};
}

template <class Backend>
at::Tensor top_k_top_p_filter_host(const at::Tensor& logits, const c10::optional<at::Tensor>& top_k_rows,
                                   const c10::optional<at::Tensor>& top_p_rows,
                                   const c10::optional<at::Tensor>& min_p_rows, int64_t top_k, double top_p,
                                   double min_p) {
  const typename Backend::Guard guard(logits.device());
  Inputs in = check_filter_inputs(logits, top_k_rows, top_p_rows, min_p_rows, top_k, top_p, min_p);
  if constexpr (Backend::kReadsHostValues) check_knob_rows(in);
  auto out = at::empty_like(in.logits);
  if (in.logits.numel() > 0) Backend::filter(in, out);
  return out;
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> speculative_accept_host(const at::Tensor& draft_probs,
                                                           const at::Tensor& draft_token_ids,
                                                           const at::Tensor& target_probs, const at::Tensor& seed) {
  const typename Backend::Guard guard(draft_probs.device());
  // Draft ids outside [0, V) are not an error: they are rejected (accept_walk of sampling.h).
  SpecInputs s = check_spec_inputs(draft_probs, draft_token_ids, target_probs, seed);
  auto out = at::empty({s.B, s.n + 1}, draft_token_ids.options().dtype(at::kLong));
  auto accepted = at::empty({s.B}, draft_token_ids.options().dtype(at::kLong));
  if (s.B > 0) Backend::speculative(s, out, accepted);
  return {out, accepted};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> unmask_step_host(
    const at::Tensor& logits, const at::Tensor& tokens, const c10::optional<at::Tensor>& num_reveal_rows,
    const c10::optional<at::Tensor>& prev_tokens, const at::Tensor& seed,
    const c10::optional<at::Tensor>& temperature_rows, const c10::optional<at::Tensor>& top_k_rows,
    const c10::optional<at::Tensor>& top_p_rows, const c10::optional<at::Tensor>& min_p_rows,
    const c10::optional<at::Tensor>& repetition_rows, const c10::optional<at::Tensor>& presence_rows,
    const c10::optional<at::Tensor>& frequency_rows, int64_t mask_token_id, int64_t num_reveal,
    c10::string_view strategy, double temperature, int64_t top_k, double top_p, double min_p, double repetition,
    double presence, double frequency) {
  const typename Backend::Guard guard(logits.device());
  UnmaskInputs u = check_unmask_inputs({logits, tokens, num_reveal_rows, prev_tokens, seed,
                                        {temperature_rows, top_k_rows, top_p_rows, min_p_rows, repetition_rows,
                                         presence_rows, frequency_rows, temperature, top_k, top_p, min_p, repetition,
                                         presence, frequency},
                                        mask_token_id, num_reveal, strategy});
  if constexpr (Backend::kReadsHostValues) {
    check_unmask_rows(u);
    if (u.in.prev.defined()) check_prev_range(u.in.p);
  }
  auto out = at::empty_like(u.tokens);
  auto drawn = at::empty_like(u.tokens);
  auto confidence = at::empty(u.tokens.sizes(), u.tokens.options().dtype(at::kFloat));
  if (u.tokens.numel() > 0) Backend::unmask(u, out, drawn, confidence);
  return {out.to(tokens.scalar_type()), drawn, confidence};
}

}  // namespace sampling
}  // namespace pk

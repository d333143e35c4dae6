// CPU kernels reached straight from Python (pretrain_kernels._C, csrc/module.cpp) on the fast
// paths of the public wrappers, without the dispatcher's boxed call. On a tiny input (one decode
// token) boxing a dozen arguments into IValues and back costs more than the kernel itself; these
// entries take only the arguments the fast path varies. module.cpp calls them only for dense CPU
// tensors whose dispatch would land on the CPU kernel anyway (no autograd to record, no autocast,
// no mode, no subclass), so the result is the op's, bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace pk {
namespace attention {
namespace cpu {

// flash_attn_fwd on dense (batch, seqlen, heads, head_dim) inputs with no varlen, mask, softcap,
// ALiBi, prefix or dropout: window (-1, window_right), aligned bottom-right or top-left.
std::tuple<at::Tensor, at::Tensor> forward_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale, int64_t window_right, bool bottom_right);

}  // namespace cpu
}  // namespace attention

namespace cpu {

// The CPU kernels of mlm_mask and span_mask, with the ops' arguments in schema order.
std::tuple<at::Tensor, at::Tensor> mlm_mask(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                                            const std::optional<at::Tensor>& special_ids,
                                            const std::optional<at::Tensor>& word_starts,
                                            const std::optional<at::Tensor>& mask_prob_rows, const at::Tensor& seed,
                                            double mask_prob, int64_t mask_token_id, int64_t vocab_size,
                                            double replace_prob, double random_prob, bool exact_count,
                                            int64_t max_predictions);
std::tuple<at::Tensor, at::Tensor> span_mask(const at::Tensor& input_ids,
                                             const std::optional<at::Tensor>& attention_mask,
                                             const std::optional<at::Tensor>& special_ids,
                                             const std::optional<at::Tensor>& word_starts,
                                             const std::optional<at::Tensor>& mask_prob_rows, const at::Tensor& seed,
                                             double mask_prob, int64_t mask_token_id, int64_t vocab_size,
                                             double replace_prob, double random_prob, double geometric_p,
                                             int64_t max_span);

// The CPU kernel of diffusion_loss (the per-sample losses), with the op's arguments.
at::Tensor diffusion_loss(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& timesteps,
                          const std::optional<at::Tensor>& alphas_cumprod, c10::string_view weighting, double gamma,
                          c10::string_view prediction_type);

}  // namespace cpu
}  // namespace pk

// Every op schema of pretrain-kernels, in one place. Kernels register against these in
// csrc/cpu/<family>.cpp (CPU key) and csrc/cuda/<family>.cu (CUDA key); fake kernels and
// autograd live in python/pretrain_kernels/ops/<family>.py.
#include <torch/library.h>

TORCH_LIBRARY(pretrain_kernels, m) {
  // ---- masking (csrc/{cpu,cuda}/masking) ----
  // seed: one-element int64 tensor on the CPU or on the input's device.
  // mask_prob_rows: optional per-row rates [B] overriding mask_prob.
  m.def(
      "mlm_mask(Tensor input_ids, Tensor? attention_mask, Tensor? special_ids, Tensor? word_starts, "
      "Tensor? mask_prob_rows, Tensor seed, float mask_prob, int mask_token_id, int vocab_size, "
      "float replace_prob, float random_prob, bool exact_count, int max_predictions) -> (Tensor, Tensor)");
  m.def(
      "span_mask(Tensor input_ids, Tensor? attention_mask, Tensor? special_ids, Tensor? word_starts, "
      "Tensor? mask_prob_rows, Tensor seed, float mask_prob, int mask_token_id, int vocab_size, "
      "float replace_prob, float random_prob, float geometric_p, int max_span) -> (Tensor, Tensor)");
}

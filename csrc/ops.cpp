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

  // ---- sampling (csrc/{cpu,cuda}/sampling) ----
  // seed: int64 tensor of one element (row i draws with (seed, i)) or [B] (row i draws with
  // (seed[i], 0)), on the CPU or on the logits' device. *_rows: optional per-row knobs [B]
  // (float32; top_k_rows int64) overriding the scalar of the same name.
  // sample -> (tokens [B] int64, logprobs [B] float32).
  m.def(
      "sample(Tensor logits, Tensor? prev_tokens, Tensor seed, Tensor? temperature_rows, Tensor? top_k_rows, "
      "Tensor? top_p_rows, Tensor? min_p_rows, Tensor? repetition_penalty_rows, Tensor? presence_penalty_rows, "
      "Tensor? frequency_penalty_rows, float temperature, int top_k, float top_p, float min_p, "
      "float repetition_penalty, float presence_penalty, float frequency_penalty) -> (Tensor, Tensor)");
  // The logits with -inf outside the kept set (same dtype and shape).
  m.def(
      "top_k_top_p_filter(Tensor logits, Tensor? top_k_rows, Tensor? top_p_rows, Tensor? min_p_rows, int top_k, "
      "float top_p, float min_p) -> Tensor");
  // Chain speculative sampling: draft_probs [B, n, V], draft_token_ids [B, n], target_probs [B, n+1, V]
  // -> (output_token_ids [B, n+1] int64, -1 after the last emitted token; num_accepted [B] int64).
  m.def("speculative_accept(Tensor draft_probs, Tensor draft_token_ids, Tensor target_probs, Tensor seed) -> (Tensor, Tensor)");
}

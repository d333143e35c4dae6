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

  // ---- attention (csrc/cpu/attention*.cpp) ----
  // Layout (batch, seqlen, heads, head_dim), or packed (tokens, heads, head_dim) with int32
  // cu_seqlens_q/k (varlen). k/v may have fewer heads (GQA). Query i sees key j when
  // j - (i + offset) lies in [-window_left, window_right] (-1: unbounded; causal is
  // window_right = 0), offset = Sk - Sq when bottom_right else 0. attn_mask: bool (true =
  // attend) or float32 (added), shaped (batch, heads, Sq, Sk), broadcast through strides.
  // max_seqlen_q/k: -1 when unknown. lse: float32 (float64 for float64 inputs), shaped
  // (batch, heads, Sq), or (heads, total_q) for varlen.
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? attn_mask, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
      "bool bottom_right) -> (Tensor out, Tensor lse)");
  // Gradients of flash_attn_fwd from its saved output and lse; dlse: gradient of the lse.
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? attn_mask, int max_seqlen_q, int max_seqlen_k, "
      "float scale, int window_left, int window_right, bool bottom_right) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decode / chunked prefill against a cache (batch, max_seqlen, kv_heads, head_dim): k_new and
  // v_new are written into the caches at each row's cache_seqlens (int32) position, then q
  // attends to the first cache_seqlens + seqlen_new keys (causal: aligned bottom-right).
  m.def(
      "flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
      "Tensor? v_new, float scale, bool causal) -> Tensor");
}

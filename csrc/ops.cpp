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
  // Masked-diffusion sampling step: logits [B, L, V], tokens [B, L] int32/int64. Every position
  // holding mask_token_id draws a token (never mask_token_id) with the knobs of sample (row b's knobs and seed,
  // position l the draw counter); then num_reveal (or num_reveal_rows [B]) of them per row are
  // revealed, strategy "confidence" (most confident first) or "random".
  // -> (new tokens [B, L] (dtype of tokens), drawn [B, L] int64 (-1 where nothing was drawn),
  //     confidence [B, L] float32 (-1 where nothing was drawn)).
  m.def(
      "unmask_step(Tensor logits, Tensor tokens, Tensor? num_reveal_rows, Tensor? prev_tokens, Tensor seed, "
      "Tensor? temperature_rows, Tensor? top_k_rows, Tensor? top_p_rows, Tensor? min_p_rows, "
      "Tensor? repetition_penalty_rows, Tensor? presence_penalty_rows, Tensor? frequency_penalty_rows, "
      "int mask_token_id, int num_reveal, str strategy, float temperature, int top_k, float top_p, float min_p, "
      "float repetition_penalty, float presence_penalty, float frequency_penalty) -> (Tensor, Tensor, Tensor)");
  // ---- diffusion (csrc/{cpu,cuda}/diffusion, math in csrc/common/diffusion.h) ----
  // Per-sample parameters (timesteps, sigmas): one value or one per sample (dim 0 of the
  // sample); a one-element CPU tensor may feed a CUDA op. alphas_cumprod: float64 table.
  // prev_timesteps < 0 means "after the last step" (alpha_bar = 1, or final_alpha_cumprod).
  // seed: one-element int64 tensor (CPU or the sample's device), used when a step draws
  // noise and no noise tensor is given. Steps return (prev_sample, pred_original_sample),
  // heun_step (prev_sample, derivative); flow_match_step an empty second output unless
  // return_x0 (one write less per element).
  m.def("add_noise(Tensor x0, Tensor noise, Tensor timesteps, Tensor? alphas_cumprod, str target) -> (Tensor, Tensor)");
  m.def(
      "diffusion_loss(Tensor pred, Tensor target, Tensor? timesteps, Tensor? alphas_cumprod, str weighting, "
      "float gamma, str prediction_type) -> Tensor");
  m.def(
      "diffusion_loss_backward(Tensor grad, Tensor pred, Tensor target, Tensor? timesteps, Tensor? alphas_cumprod, "
      "str weighting, float gamma, str prediction_type) -> Tensor");
  m.def(
      "ddpm_step(Tensor model_output, Tensor sample, Tensor timesteps, Tensor prev_timesteps, Tensor alphas_cumprod, "
      "Tensor? noise, Tensor? seed, str prediction_type, str variance_type, bool clip_sample, "
      "float clip_sample_range) -> (Tensor, Tensor)");
  m.def(
      "ddim_step(Tensor model_output, Tensor sample, Tensor timesteps, Tensor prev_timesteps, Tensor alphas_cumprod, "
      "Tensor? noise, Tensor? seed, float final_alpha_cumprod, float eta, str prediction_type, bool clip_sample, "
      "float clip_sample_range, bool use_clipped_model_output) -> (Tensor, Tensor)");
  m.def(
      "euler_step(Tensor model_output, Tensor sample, Tensor sigma, Tensor sigma_next, Tensor? noise, Tensor? seed, "
      "str prediction_type, float churn_gamma, float s_tmin, float s_tmax, float s_noise) -> (Tensor, Tensor)");
  m.def(
      "heun_step(Tensor model_output, Tensor sample, Tensor sigma, Tensor sigma_next, Tensor? prev_derivative, "
      "Tensor? prev_sample, str prediction_type, bool clip_sample, float clip_sample_range) -> (Tensor, Tensor)");
  m.def(
      "dpmpp_2m_step(Tensor model_output, Tensor sample, Tensor? prev_x0, Tensor? sigma_prev, Tensor sigma, "
      "Tensor sigma_next, Tensor? noise, Tensor? seed, str prediction_type, str algorithm_type, str solver_type, "
      "int order, bool flow_sigmas) -> (Tensor, Tensor)");
  m.def(
      "flow_match_step(Tensor model_output, Tensor sample, Tensor sigma, Tensor sigma_next, Tensor? noise, "
      "Tensor? seed, bool stochastic, bool return_x0) -> (Tensor, Tensor)");
  // ---- loss (csrc/{cpu,cuda}/loss, row math in csrc/common/loss.h, chunk loop in loss_ops.h) ----
  // Fused LM head + cross-entropy: hidden [N, H], weight [V, H] (same float dtype), targets [N]
  // int64/int32, bias [V] or None. Logits = hidden @ weight^T + bias, capped by
  // softcap * tanh(logits / softcap) when softcap > 0, never materialised beyond one chunk of
  // chunk_size rows (0: chosen from N and V, csrc/common/loss.h). reduction 'mean' | 'sum' |
  // 'none'. loss: 0-d (or [N] for 'none'), float32 (float64 for float64 inputs).
  // compute_grad ('mean'/'sum' only): also the gradients of the loss for grad_output = 1
  // (grad_hidden [N, H], grad_weight [V, H], grad_bias [V] or empty); else they are empty.
  // grads (both ops): the gradients wanted, bits 1 hidden, 2 weight, 4 bias; the others empty.
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, int ignore_index, "
      "float label_smoothing, float softcap, str reduction, bool compute_grad, int chunk_size, int grads=7) "
      "-> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // The same gradients for an upstream grad_loss (0-d, or [N] for 'none'), recomputing the chunks.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "int ignore_index, float label_smoothing, float softcap, str reduction, int chunk_size, int grads=7) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // ---- rotary position embedding (csrc/{cpu,cuda}/rotary, shared math and checks in
  // csrc/common/rotary.h) ----
  // x [B, T, H, D] or varlen [tokens, H, D] (any strides); cos/sin [T, rd/2], or per token
  // [B, T, rd/2] ([tokens, rd/2] for varlen), any float dtype (read as float32, float64 for
  // float64 x). The first rd features of each head rotate in pairs (x[2i], x[2i+1]) when
  // interleaved, else (x[i], x[i + rd/2]); the rest are copied. conjugate: by -theta (the
  // backward). Returns a new contiguous tensor like x.
  m.def("rotary_embedding(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool conjugate) -> Tensor");
  // ---- decoder layers (csrc/{cpu,cuda}/layers, shared math and checks in csrc/common/layers.h) ----
  // rms_norm over the last dim of x (any shape, float32/float16/bfloat16/float64); weight [D] in
  // x's dtype or float32, or None. y = round(round(x * rstd) * (offset + w)) when
  // round_before_weight (transformers' LlamaRMSNorm), else round(x * rstd * (offset + w))
  // (GemmaRMSNorm); round = the cast to x's dtype. -> (y like x, rstd [x.shape[:-1]] float32,
  // float64 for float64 x).
  m.def("rms_norm(Tensor x, Tensor? weight, float eps, float offset, bool round_before_weight) -> (Tensor, Tensor)");
  // -> (grad_x like x, grad_weight like weight; empty without a weight or when not weight_grad).
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd, float offset, "
      "bool round_before_weight, bool weight_grad) -> (Tensor, Tensor)");
  // silu(gate) * up, gate and up of one shape and dtype (silu rounded to the dtype, then the product).
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  // -> (grad_gate, grad_up), silu recomputed from gate.
  m.def("swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  // gelu(x) as torch's F.gelu, approximate "none" (the erf form) or "tanh"; math in float32
  // (float64 for float64 x), rounded once to x's dtype. -> like x.
  m.def("gelu(Tensor x, str approximate) -> Tensor");
  // -> grad_x like x, gelu's derivative recomputed from x.
  m.def("gelu_backward(Tensor grad_out, Tensor x, str approximate) -> Tensor");
  // ---- attention (csrc/{cpu,cuda}/attention*) ----
  // Layout (batch, seqlen, heads, head_dim), or packed (tokens, heads, head_dim) with int32
  // cu_seqlens_q/k (varlen). k/v may have fewer heads (GQA). Query i sees key j when
  // j - (i + offset) lies in [-window_left, window_right] (-1: unbounded; causal is
  // window_right = 0), offset = Sk - Sq when bottom_right else 0. attn_mask: bool (true =
  // attend) or float32 (added), shaped (batch, heads, Sq, Sk), broadcast through strides.
  // max_seqlen_q/k: -1 when unknown. lse: float32 (float64 for float64 inputs), shaped
  // (batch, heads, Sq), or (heads, total_q) for varlen. softcap: the scaled scores become
  // softcap * tanh(score / softcap) before any mask (0: off); alibi_slopes: float32 [heads] or
  // [batch, heads], adds -slope * |i + offset - j| after the cap (no gradient). prefix_lens:
  // int32 [batch], prefix-LM: query i of sequence b also sees the keys j < prefix_lens[b]
  // (bidirectional prefix; the left window still applies); the CPU raises on values outside
  // [0, Sk_b], the kernels clamp them into it (csrc/common/attention.h). All three default to
  // off (also in flash_attn_bwd; softcap and alibi_slopes in flash_attn_kvcache).
  // dropout_p in [0, 1] with dropout_seed int64 [2] (seed, offset; CPU or q's device; required
  // when dropout_p > 0): attention dropout, the keep mask a pure function of (seed, offset,
  // sequence, head, query, key) (csrc/common/attention_dropout.h); the lse is the no-dropout one.
  // flash_attn_bwd takes the same pair and regenerates the mask.
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? attn_mask, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
      "bool bottom_right, float softcap=0.0, Tensor? alibi_slopes=None, Tensor? prefix_lens=None, "
      "float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor out, Tensor lse)");
  // Gradients of flash_attn_fwd from its saved output and lse; dlse: gradient of the lse.
  // deterministic: bit-for-bit reproducible gradients (CUDA: no float atomics in dQ; the CPU
  // backward is deterministic either way). torch.use_deterministic_algorithms(True) implies it;
  // the default, false, is that of pk.flash_attention and of a direct flash_attn_fwd backward.
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? attn_mask, int max_seqlen_q, int max_seqlen_k, "
      "float scale, int window_left, int window_right, bool bottom_right, float softcap=0.0, "
      "Tensor? alibi_slopes=None, Tensor? prefix_lens=None, float dropout_p=0.0, Tensor? dropout_seed=None, "
      "bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Decode / chunked prefill against a cache (batch, max_seqlen, kv_heads, head_dim), or a paged
  // cache (num_blocks, page_size, kv_heads, head_dim) with int32 block_table [batch, max_blocks]:
  // k_new and v_new are written into the caches at each row's cache_seqlens (int32) position,
  // then q attends to the first cache_seqlens + seqlen_new keys (causal and the window aligned
  // bottom-right; causal sets window_right = 0). lse: (batch, heads, seqlen_q), float32 (float64
  // for float64 inputs). softcap / alibi_slopes as in flash_attn_fwd.
  m.def(
      "flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
      "Tensor? v_new, float scale, bool causal, int window_left, int window_right, Tensor? block_table, "
      "float softcap=0.0, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
}

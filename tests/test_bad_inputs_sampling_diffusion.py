"""Bad and unusual inputs for the sampling and denoising families, table driven.

Every public function (pk.sample, pk.top_k_top_p_filter, pk.TopKTopPLogitsWarper,
pk.speculative_accept, pk.unmask_step, pk.noise_schedule, pk.add_noise, pk.diffusion_loss, the solver steps,
pk.sample_timesteps, pk.shift_sigmas, pk.schedulers.*) and every raw op meets the list: wrong
dtypes, ranks and devices (the meta device stands in for a second device), empty dimensions,
non-contiguous / expanded (stride 0) / flipped views, NaN / inf / negative / huge knobs,
out-of-range ids and timesteps, malformed seeds.

  * BAD_*: invalid input raises a clear error naming the argument: TypeError / ValueError from
    the wrappers, RuntimeError from the raw ops. The raw-op tables also run through the
    emulated CUDA ops (tests/emulated_cuda.py): the CUDA entry points share the host checks
    (csrc/common/sampling_checks.h, diffusion_ops.h), so the same error comes out.
  * VALID_*: valid but unusual input gives the result of the plain contiguous call (or of the
    float64 references in tests/reference.py).
  * the documented rules where a device cannot be checked without a host sync (per-row
    sampling knobs, out-of-vocabulary draft ids, flow sigmas), checked on the emulated kernels.
"""
import math

import pytest
import torch

import emulated_cuda
import pretrain_kernels as pk
import reference as ref

OPS = torch.ops.pretrain_kernels
INF, NAN = math.inf, math.nan
META = "meta"


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_g(seed), dtype=torch.float64).to(dtype)


def _probs(B, n, V, seed):
    return torch.softmax(_randn(B, n, V, seed=seed) * 2, dim=-1).float()


# ---- shared inputs (small: the emulated kernels run one fiber per CUDA thread) ---------------

X = _randn(3, 11, seed=1) * 2                    # logits [B=3, V=11]
PREV = torch.tensor([[1, 2, 2], [0, -1, 10], [5, 5, 5]])
SEED = torch.tensor([5])
DRAFT, TARGET = _probs(2, 3, 7, 2), _probs(2, 4, 7, 3)
IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])
ACP = pk.noise_schedule("linear", 20)           # alphas_cumprod, 20 steps
S = _randn(2, 3, 4, seed=4)                      # a sample [B=2, 3, 4]
MO = _randn(2, 3, 4, seed=5)                     # a model output
N = _randn(2, 3, 4, seed=6)                      # noise
T2 = torch.tensor([3, 17])                       # per-sample timesteps
SIG = torch.tensor([2.0, 1.5])                   # per-sample Karras sigmas
_T = torch.tensor


def _ids(table):
    return [c[0] for c in table]


# ---- raw-op call helpers (ops = torch.ops.pretrain_kernels or the emulated namespace) -------

_KNOB_NAMES = ("temperature", "top_k", "top_p", "min_p", "repetition", "presence", "frequency")
_KNOB_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition=1.0, presence=0.0, frequency=0.0)


def _sample(ops, logits=X, prev=None, seed=SEED, rows=None, **knobs):
    rows = rows or {}
    k = dict(_KNOB_DEFAULTS, **knobs)
    return ops.sample(logits, prev, seed, *(rows.get(n) for n in _KNOB_NAMES), *(k[n] for n in _KNOB_NAMES))


def _filter(ops, logits=X, rows=None, top_k=0, top_p=1.0, min_p=0.0):
    rows = rows or {}
    return ops.top_k_top_p_filter(logits, rows.get("top_k"), rows.get("top_p"), rows.get("min_p"), top_k, top_p,
                                  min_p)


def _spec(ops, draft=DRAFT, ids=IDS, target=TARGET, seed=SEED):
    return ops.speculative_accept(draft, ids, target, seed)


UX = _randn(2, 3, 11, seed=8) * 2                 # unmask_step logits [B=2, L=3, V=11]
UT = torch.tensor([[10, 4, 10], [10, 10, 1]])     # tokens, mask token 10


def _unmask(ops, logits=UX, tokens=UT, n_rows=None, prev=None, seed=SEED, rows=None, mask=10, n=1,
            strategy="confidence", **knobs):
    rows = rows or {}
    k = dict(_KNOB_DEFAULTS, **knobs)
    return ops.unmask_step(logits, tokens, n_rows, prev, seed, *(rows.get(n) for n in _KNOB_NAMES), mask, n, strategy,
                           *(k[n] for n in _KNOB_NAMES))


def _add_noise(ops, x0=S, noise=N, t=T2, acp=ACP, target="epsilon"):
    return ops.add_noise(x0, noise, t, acp, target)


def _loss(ops, pred=S, target=N, t=None, acp=None, weighting="none", gamma=5.0, pt="epsilon"):
    return ops.diffusion_loss(pred, target, t, acp, weighting, gamma, pt)


def _loss_bwd(ops, grad=_T([1.0, 1.0]), pred=S, target=N, t=None, acp=None, weighting="none", gamma=5.0,
              pt="epsilon"):
    return ops.diffusion_loss_backward(grad, pred, target, t, acp, weighting, gamma, pt)


def _ddpm(ops, mo=MO, x=S, t=T2, prev=_T([2, 16]), acp=ACP, noise=N, seed=None, pt="epsilon", var="fixed_small",
          clip=True, rng=1.0):
    return ops.ddpm_step(mo, x, t, prev, acp, noise, seed, pt, var, clip, rng)


def _ddim(ops, mo=MO, x=S, t=T2, prev=_T([-1, 7]), acp=ACP, noise=None, seed=None, final=1.0, eta=0.0,
          pt="epsilon", clip=True, rng=1.0, use_clipped=False):
    return ops.ddim_step(mo, x, t, prev, acp, noise, seed, final, eta, pt, clip, rng, use_clipped)


def _euler(ops, mo=MO, x=S, sigma=SIG, sigma_next=_T(0.5), noise=None, seed=None, pt="epsilon", churn=0.0,
           tmin=0.0, tmax=INF, snoise=1.0):
    return ops.euler_step(mo, x, sigma, sigma_next, noise, seed, pt, churn, tmin, tmax, snoise)


def _heun(ops, mo=MO, x=S, sigma=SIG, sigma_next=_T(0.5), dprev=None, sprev=None, pt="epsilon", clip=False,
          rng=1.0):
    return ops.heun_step(mo, x, sigma, sigma_next, dprev, sprev, pt, clip, rng)


def _dpm(ops, mo=MO, x=S, prev_x0=None, sigma_prev=None, sigma=SIG, sigma_next=_T(0.5), noise=None, seed=None,
         pt="epsilon", algo="dpmsolver++", solver="midpoint", order=1, flow=False):
    return ops.dpmpp_2m_step(mo, x, prev_x0, sigma_prev, sigma, sigma_next, noise, seed, pt, algo, solver, order,
                             flow)


def _flow(ops, mo=MO, x=S, sigma=_T(0.8), sigma_next=_T(0.6), noise=None, seed=None, stochastic=False,
          return_x0=True):
    return ops.flow_match_step(mo, x, sigma, sigma_next, noise, seed, stochastic, return_x0)


# ================================================================================================
# Sampling: wrappers
# ================================================================================================

_SPEC = dict(draft_probs=DRAFT, draft_token_ids=IDS, target_probs=TARGET)


def _spec_w(**kw):
    a = dict(_SPEC)
    seed = kw.pop("seed", 1)
    a.update(kw)
    return pk.speculative_accept(a["draft_probs"], a["draft_token_ids"], a["target_probs"], seed=seed)


# (id, call, exception, message)
BAD_SAMPLING = [
    # logits: dtype, rank, type, empty vocabulary, vocabulary limit
    ("logits-int", lambda: pk.sample(X.long()), TypeError, "logits: expected float32"),
    ("logits-bool", lambda: pk.sample(X > 0), TypeError, "logits: expected float32"),
    ("logits-complex", lambda: pk.sample(X.to(torch.complex64)), TypeError, "logits: expected float32"),
    ("logits-1d", lambda: pk.sample(X[0]), ValueError, r"logits: expected shape \[batch, vocab\]"),
    ("logits-3d", lambda: pk.sample(X[None]), ValueError, r"logits: expected shape \[batch, vocab\]"),
    ("logits-0d", lambda: pk.sample(X[0, 0]), ValueError, "logits: expected shape"),
    ("logits-list", lambda: pk.sample(X.tolist()), TypeError, "logits: expected a torch.Tensor"),
    ("logits-empty-vocab", lambda: pk.sample(torch.zeros(2, 0)), ValueError, "logits: the vocabulary dimension is empty"),
    ("logits-vocab-limit", lambda: pk.sample(torch.empty(0, 2**27 + 1)), ValueError, "logits: vocabularies up to 2"),
    # temperature
    ("temperature-negative", lambda: pk.sample(X, temperature=-1.0), ValueError, "temperature: expected >= 0"),
    ("temperature-nan", lambda: pk.sample(X, temperature=NAN), ValueError, "temperature: expected >= 0"),
    ("temperature--inf", lambda: pk.sample(X, temperature=-INF), ValueError, "temperature: expected >= 0"),
    ("temperature-str", lambda: pk.sample(X, temperature="1"), TypeError, "temperature: expected a float"),
    ("temperature-bool", lambda: pk.sample(X, temperature=True), TypeError, "temperature: expected a float"),
    ("temperature-complex", lambda: pk.sample(X, temperature=1j), TypeError, "temperature: expected a float"),
    ("temperature-rows-int", lambda: pk.sample(X, temperature=_T([1, 1, 1])), TypeError,
     "temperature: expected a floating-point per-row tensor"),
    ("temperature-rows-shape", lambda: pk.sample(X, temperature=torch.ones(3, 1)), ValueError,
     r"temperature: expected a number or a per-row tensor of shape \[3\]"),
    ("temperature-rows-length", lambda: pk.sample(X, temperature=torch.ones(2)), ValueError,
     r"temperature: .*shape \[3\]"),
    ("temperature-rows-meta", lambda: pk.sample(X, temperature=torch.ones(3, device=META)), ValueError,
     "temperature: expected a tensor on cpu .the device of logits., got meta"),
    ("temperature-rows-nan", lambda: pk.sample(X, temperature=_T([1.0, NAN, 1.0])), ValueError,
     "temperature: expected >= 0 .*got nan in row 1"),
    ("temperature-rows-negative", lambda: pk.sample(X, temperature=_T([1.0, 1.0, -2.0])), ValueError,
     "temperature: .*in row 2"),
    # top_k
    ("top_k-negative", lambda: pk.sample(X, top_k=-1), ValueError, "top_k: expected >= 0"),
    ("top_k-float", lambda: pk.sample(X, top_k=2.5), TypeError, "top_k: expected an int"),
    ("top_k-str", lambda: pk.sample(X, top_k="3"), TypeError, "top_k: expected an int"),
    ("top_k-bool", lambda: pk.sample(X, top_k=True), TypeError, "top_k: expected an int"),
    ("top_k-rows-float", lambda: pk.sample(X, top_k=_T([1.0, 2.0, 3.0])), TypeError,
     "top_k: expected an integer per-row tensor"),
    ("top_k-rows-bool", lambda: pk.sample(X, top_k=_T([True, True, True])), TypeError,
     "top_k: expected an integer per-row tensor"),
    ("top_k-rows-negative", lambda: pk.sample(X, top_k=_T([1, -2, 0])), ValueError, "top_k: .*in row 1"),
    ("top_k-rows-meta", lambda: pk.sample(X, top_k=torch.ones(3, dtype=torch.long, device=META)), ValueError,
     "top_k: expected a tensor on cpu"),
    # top_p
    ("top_p-zero", lambda: pk.sample(X, top_p=0.0), ValueError, r"top_p: expected a value in \(0, 1\]"),
    ("top_p-negative", lambda: pk.sample(X, top_p=-0.5), ValueError, "top_p: expected"),
    ("top_p-above-one", lambda: pk.sample(X, top_p=1.5), ValueError, "top_p: expected"),
    ("top_p-nan", lambda: pk.sample(X, top_p=NAN), ValueError, "top_p: expected"),
    ("top_p-inf", lambda: pk.sample(X, top_p=INF), ValueError, "top_p: expected"),
    ("top_p-rows-zero", lambda: pk.sample(X, top_p=_T([0.5, 0.0, 0.5])), ValueError, "top_p: .*in row 1"),
    ("top_p-rows-nan", lambda: pk.sample(X, top_p=_T([0.5, 0.5, NAN])), ValueError, "top_p: .*in row 2"),
    # min_p
    ("min_p-negative", lambda: pk.sample(X, min_p=-0.1), ValueError, r"min_p: expected a value in \[0, 1\]"),
    ("min_p-above-one", lambda: pk.sample(X, min_p=1.5), ValueError, "min_p: expected"),
    ("min_p-nan", lambda: pk.sample(X, min_p=NAN), ValueError, "min_p: expected"),
    ("min_p-rows-inf", lambda: pk.sample(X, min_p=_T([INF, 0.0, 0.0])), ValueError, "min_p: .*in row 0"),
    # penalties
    ("repetition-zero", lambda: pk.sample(X, repetition_penalty=0.0), ValueError, "repetition_penalty: expected"),
    ("repetition-negative", lambda: pk.sample(X, repetition_penalty=-1.0), ValueError, "repetition_penalty"),
    ("repetition-nan", lambda: pk.sample(X, repetition_penalty=NAN), ValueError, "repetition_penalty"),
    ("repetition-inf", lambda: pk.sample(X, repetition_penalty=INF), ValueError, "repetition_penalty"),
    ("repetition-rows-inf", lambda: pk.sample(X, repetition_penalty=_T([1.0, INF, 1.0])), ValueError,
     "repetition_penalty: .*in row 1"),
    ("presence-nan", lambda: pk.sample(X, presence_penalty=NAN), ValueError, "presence_penalty: expected a finite"),
    ("presence-inf", lambda: pk.sample(X, presence_penalty=INF), ValueError, "presence_penalty"),
    ("presence-rows-nan", lambda: pk.sample(X, presence_penalty=_T([0.0, 0.0, NAN])), ValueError,
     "presence_penalty: .*in row 2"),
    ("frequency--inf", lambda: pk.sample(X, frequency_penalty=-INF), ValueError, "frequency_penalty"),
    ("frequency-rows-inf", lambda: pk.sample(X, frequency_penalty=_T([-INF, 0.0, 0.0])), ValueError,
     "frequency_penalty: .*in row 0"),
    # prev_tokens
    ("prev-float", lambda: pk.sample(X, prev_tokens=PREV.float()), TypeError, "prev_tokens: expected int32 or int64"),
    ("prev-int16", lambda: pk.sample(X, prev_tokens=PREV.short()), TypeError, "prev_tokens: expected int32 or int64"),
    ("prev-list", lambda: pk.sample(X, prev_tokens=PREV.tolist()), TypeError, "prev_tokens: expected a tensor"),
    ("prev-1d", lambda: pk.sample(X, prev_tokens=PREV[0]), ValueError, r"prev_tokens: expected shape \[3, n\]"),
    ("prev-batch", lambda: pk.sample(X, prev_tokens=PREV[:2]), ValueError, r"prev_tokens: expected shape \[3, n\]"),
    ("prev-id-vocab", lambda: pk.sample(X, prev_tokens=_T([[1], [11], [2]])), ValueError,
     r"prev_tokens: expected ids in \[0, 11\) or -1 .*got 11 at row 1"),
    ("prev-id-negative", lambda: pk.sample(X, prev_tokens=_T([[1], [1], [-2]])), ValueError,
     "prev_tokens: .*got -2 at row 2"),
    ("prev-id-huge", lambda: pk.sample(X, prev_tokens=_T([[2**62], [1], [1]])), ValueError, "prev_tokens: .*got 4611"),
    ("prev-meta", lambda: pk.sample(X, prev_tokens=PREV.to(META)), ValueError, "prev_tokens: expected a tensor on cpu"),
    # seeds
    ("seed-float", lambda: pk.sample(X, seed=1.5), TypeError, "seed: expected an int"),
    ("seed-str", lambda: pk.sample(X, seed="1"), TypeError, "seed: expected an int"),
    ("seed-bool", lambda: pk.sample(X, seed=True), TypeError, "seed: expected an int"),
    ("seed-too-big", lambda: pk.sample(X, seed=2**64), ValueError, r"seed: expected a value in \[-2\*\*63, 2\*\*64\)"),
    ("seed-too-small", lambda: pk.sample(X, seed=-(2**63) - 1), ValueError, "seed: expected a value in"),
    ("seed-tensor-float", lambda: pk.sample(X, seed=_T(1.0)), TypeError, "seed: expected an integer tensor"),
    ("seed-tensor-bool", lambda: pk.sample(X, seed=_T(True)), TypeError, "seed: expected an integer tensor"),
    ("seed-rows-float", lambda: pk.sample(X, seed=_T([1.0, 2.0, 3.0])), TypeError, "seed: expected integer per-row"),
    ("seed-tensor-length", lambda: pk.sample(X, seed=_T([1, 2])), ValueError, r"seed: expected one seed or one per row \[3\]"),
    ("seed-tensor-2d", lambda: pk.sample(X, seed=_T([[1, 2, 3]])), ValueError, "seed: expected one seed or one per row"),
    ("seed-tensor-empty", lambda: pk.sample(X, seed=torch.zeros(0, dtype=torch.long)), ValueError, "seed: expected one"),
    ("seed-meta", lambda: pk.sample(X, seed=_T([1], device=META)), ValueError, "seed: expected a CPU tensor"),
    ("seed-and-generator", lambda: pk.sample(X, seed=1, generator=torch.Generator()), ValueError,
     "seed and generator"),
    # top_k_top_p_filter and the logits warper
    ("filter-logits-int", lambda: pk.top_k_top_p_filter(X.int()), TypeError, "logits: expected float32"),
    ("filter-logits-1d", lambda: pk.top_k_top_p_filter(X[0]), ValueError, "logits: expected shape"),
    ("filter-empty-vocab", lambda: pk.top_k_top_p_filter(torch.zeros(1, 0)), ValueError, "logits: the vocabulary"),
    ("filter-top_k-negative", lambda: pk.top_k_top_p_filter(X, top_k=-3), ValueError, "top_k: expected >= 0"),
    ("filter-top_p-nan", lambda: pk.top_k_top_p_filter(X, top_p=NAN), ValueError, "top_p: expected"),
    ("filter-min_p-huge", lambda: pk.top_k_top_p_filter(X, min_p=1e300), ValueError, "min_p: expected"),
    ("filter-top_p-rows-shape", lambda: pk.top_k_top_p_filter(X, top_p=torch.ones(4)), ValueError, "top_p: expected"),
    ("filter-min_p-rows-nan", lambda: pk.top_k_top_p_filter(X, min_p=_T([0.1, NAN, 0.1])), ValueError,
     "min_p: .*in row 1"),
    ("warper-top_k-negative", lambda: pk.TopKTopPLogitsWarper(top_k=-1), ValueError, "top_k: expected >= 0"),
    ("warper-top_p-zero", lambda: pk.TopKTopPLogitsWarper(top_p=0.0), ValueError, "top_p: expected"),
    ("warper-min_p-nan", lambda: pk.TopKTopPLogitsWarper(min_p=NAN), ValueError, "min_p: expected"),
    ("warper-top_k-str", lambda: pk.TopKTopPLogitsWarper(top_k="5"), TypeError, "top_k: expected an int"),
    ("warper-scores-int", lambda: pk.TopKTopPLogitsWarper(top_k=2)(None, X.long()), TypeError, "logits: expected"),
    # speculative_accept
    ("spec-draft-list", lambda: _spec_w(draft_probs=DRAFT.tolist()), TypeError, "draft_probs: expected a torch.Tensor"),
    ("spec-draft-int", lambda: _spec_w(draft_probs=DRAFT.long()), TypeError, "draft_probs: expected float32"),
    ("spec-target-int", lambda: _spec_w(target_probs=TARGET.long()), TypeError, "target_probs: expected float32"),
    ("spec-draft-2d", lambda: _spec_w(draft_probs=DRAFT[0]), ValueError, r"draft_probs: expected shape \[batch, n, vocab\]"),
    ("spec-target-positions", lambda: _spec_w(target_probs=TARGET[:, :3]), ValueError,
     r"target_probs: expected shape \[2, 4, 7\]"),
    ("spec-target-vocab", lambda: _spec_w(target_probs=TARGET[..., :6]), ValueError, "target_probs: expected shape"),
    ("spec-target-dtype", lambda: _spec_w(target_probs=TARGET.double()), TypeError,
     "target_probs: expected the dtype of draft_probs"),
    ("spec-ids-float", lambda: _spec_w(draft_token_ids=IDS.float()), TypeError, "draft_token_ids: expected an int32"),
    ("spec-ids-list", lambda: _spec_w(draft_token_ids=IDS.tolist()), TypeError, "draft_token_ids: expected an int32"),
    ("spec-ids-shape", lambda: _spec_w(draft_token_ids=IDS[:, :2]), ValueError, r"draft_token_ids: expected shape \[2, 3\]"),
    ("spec-ids-meta", lambda: _spec_w(draft_token_ids=IDS.to(META)), ValueError,
     "draft_token_ids: expected a tensor on cpu .the device of draft_probs."),
    ("spec-target-meta", lambda: _spec_w(target_probs=TARGET.to(META)), ValueError, "target_probs: expected a tensor on"),
    ("spec-empty-vocab", lambda: _spec_w(draft_probs=DRAFT[..., :0], target_probs=TARGET[..., :0]), ValueError,
     "draft_probs: the vocabulary dimension is empty"),
    ("spec-seed-float", lambda: _spec_w(seed=0.5), TypeError, "seed: expected an int"),
    ("spec-seed-length", lambda: _spec_w(seed=_T([1, 2, 3])), ValueError, r"seed: expected one seed or one per row \[2\]"),
    # unmask_step
    ("unmask-logits-2d", lambda: _unmask_w(logits=UX[0]), ValueError, r"logits: expected shape \[batch, length, vocab\]"),
    ("unmask-logits-int", lambda: _unmask_w(logits=UX.long()), TypeError, "logits: expected float32"),
    ("unmask-logits-list", lambda: _unmask_w(logits=UX.tolist()), TypeError, "logits: expected a torch.Tensor"),
    ("unmask-empty-vocab", lambda: _unmask_w(logits=UX[..., :0]), ValueError, "logits: the vocabulary dimension is empty"),
    ("unmask-tokens-float", lambda: _unmask_w(tokens=UT.float()), TypeError, "tokens: expected int32 or int64"),
    ("unmask-tokens-list", lambda: _unmask_w(tokens=UT.tolist()), TypeError, "tokens: expected a torch.Tensor"),
    ("unmask-tokens-shape", lambda: _unmask_w(tokens=UT[:, :2]), ValueError, r"tokens: expected shape \[2, 3\]"),
    ("unmask-tokens-meta", lambda: _unmask_w(tokens=UT.to(META)), ValueError, "tokens: expected a tensor on cpu"),
    ("unmask-mask-id-negative", lambda: _unmask_w(mask_token_id=-1), ValueError, r"mask_token_id: expected an id in \[0, 11\)"),
    ("unmask-mask-id-vocab", lambda: _unmask_w(mask_token_id=11), ValueError, r"mask_token_id: expected an id in \[0, 11\)"),
    ("unmask-mask-id-float", lambda: _unmask_w(mask_token_id=10.0), TypeError, "mask_token_id: expected an int"),
    ("unmask-num-reveal-negative", lambda: _unmask_w(num_reveal=-1), ValueError, "num_reveal: expected >= 0"),
    ("unmask-num-reveal-float", lambda: _unmask_w(num_reveal=1.5), TypeError, "num_reveal: expected an int"),
    ("unmask-num-reveal-rows-negative", lambda: _unmask_w(num_reveal=_T([1, -2])), ValueError, "num_reveal: .*in row 1"),
    ("unmask-num-reveal-rows-float", lambda: _unmask_w(num_reveal=_T([1.0, 2.0])), TypeError,
     "num_reveal: expected an integer"),
    ("unmask-num-reveal-rows-shape", lambda: _unmask_w(num_reveal=_T([1, 2, 3])), ValueError,
     r"num_reveal: expected an int or a per-row tensor of shape \[2\]"),
    ("unmask-strategy", lambda: _unmask_w(strategy="entropy"), ValueError, "strategy: expected 'confidence' or 'random'"),
    ("unmask-strategy-type", lambda: _unmask_w(strategy=None), TypeError, "strategy: expected a str"),
    ("unmask-temperature-negative", lambda: _unmask_w(temperature=-1.0), ValueError, "temperature: expected >= 0"),
    ("unmask-top_p-rows", lambda: _unmask_w(top_p=_T([0.5, 1.5])), ValueError, "top_p: .*in row 1"),
    ("unmask-prev-oov", lambda: _unmask_w(prev_tokens=_T([[1], [11]])), ValueError, r"prev_tokens: expected ids in \[0, 11\)"),
    ("unmask-seed-length", lambda: _unmask_w(seed=_T([1, 2, 3])), ValueError, r"seed: expected one seed or one per row \[2\]"),
]


def _unmask_w(**kw):
    a = dict(logits=UX, tokens=UT, mask_token_id=10, num_reveal=1, seed=1)
    a.update(kw)
    return pk.unmask_step(a.pop("logits"), a.pop("tokens"), **a)


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_SAMPLING], ids=_ids(BAD_SAMPLING))
def test_bad_sampling_wrappers(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ================================================================================================
# Sampling: raw ops (the CPU kernels, and the CUDA entry points through the emulator)
# ================================================================================================

_R = dict  # per-row tensors of a raw call

# (id, call(ops), message, where): where "both" = CPU and emulated CUDA, "cpu" = the CPU only
# (value checks of per-row tensors and prev_tokens need the values on the host; the meta device
# has no emulated kernels).
BAD_SAMPLING_RAW = [
    ("logits-int", lambda o: _sample(o, X.long()), "logits: expected float32", "both"),
    ("logits-1d", lambda o: _sample(o, X[0]), "logits: expected a 2-D tensor", "both"),
    ("logits-3d", lambda o: _sample(o, X[None]), "logits: expected a 2-D tensor", "both"),
    ("logits-empty-vocab", lambda o: _sample(o, torch.zeros(2, 0)), "logits: the vocabulary dimension is empty", "both"),
    ("logits-vocab-limit", lambda o: _sample(o, torch.empty(0, 2**27 + 1)), "logits: vocabularies up to 2", "both"),
    ("temperature-negative", lambda o: _sample(o, temperature=-0.5), "temperature: expected >= 0", "both"),
    ("temperature-nan", lambda o: _sample(o, temperature=NAN), "temperature: expected >= 0", "both"),
    ("top_k-negative", lambda o: _sample(o, top_k=-1), "top_k: expected >= 0", "both"),
    ("top_p-zero", lambda o: _sample(o, top_p=0.0), r"top_p: expected a value in \(0, 1\]", "both"),
    ("top_p-nan", lambda o: _sample(o, top_p=NAN), "top_p: expected", "both"),
    ("top_p-huge", lambda o: _sample(o, top_p=1e300), "top_p: expected", "both"),
    ("min_p-nan", lambda o: _sample(o, min_p=NAN), r"min_p: expected a value in \[0, 1\]", "both"),
    ("min_p-negative", lambda o: _sample(o, min_p=-1e-300), "min_p: expected", "both"),
    ("repetition-zero", lambda o: _sample(o, repetition=0.0), "repetition_penalty: expected a finite value > 0", "both"),
    ("repetition-inf", lambda o: _sample(o, repetition=INF), "repetition_penalty: expected", "both"),
    ("presence-nan", lambda o: _sample(o, presence=NAN), "presence_penalty: expected a finite value", "both"),
    ("frequency-inf", lambda o: _sample(o, frequency=-INF), "frequency_penalty: expected a finite value", "both"),
    ("rows-shape", lambda o: _sample(o, rows=_R(temperature=torch.ones(3, 1))),
     r"temperature: expected a per-row tensor of shape \[3\]", "both"),
    ("rows-length", lambda o: _sample(o, rows=_R(top_p=torch.ones(4))), r"top_p: expected a per-row tensor of shape \[3\]",
     "both"),
    ("rows-int-temperature", lambda o: _sample(o, rows=_R(temperature=torch.ones(3, dtype=torch.long))),
     "temperature: expected a floating-point tensor", "both"),
    ("rows-float-top_k", lambda o: _sample(o, rows=_R(top_k=torch.ones(3))), "top_k: expected an integer tensor", "both"),
    ("rows-bool-top_k", lambda o: _sample(o, rows=_R(top_k=torch.ones(3, dtype=torch.bool))),
     "top_k: expected an integer tensor", "both"),
    ("rows-meta", lambda o: _sample(o, rows=_R(min_p=torch.zeros(3, device=META))),
     "min_p: expected a tensor on cpu .the device of logits., got meta", "cpu"),
    ("rows-temperature-nan", lambda o: _sample(o, rows=_R(temperature=_T([1.0, NAN, 1.0]))),
     "temperature: expected >= 0 .*got nan in row 1", "cpu"),
    ("rows-top_k-negative", lambda o: _sample(o, rows=_R(top_k=_T([0, 0, -4]))), "top_k: .*got -4 in row 2", "cpu"),
    ("rows-top_p-huge-double", lambda o: _sample(o, rows=_R(top_p=_T([0.5, 1e300, 0.5], dtype=torch.float64))),
     "top_p: .*in row 1", "cpu"),
    ("rows-min_p-negative-tiny", lambda o: _sample(o, rows=_R(min_p=_T([0.0, 0.0, -1e-300], dtype=torch.float64))),
     "min_p: .*in row 2", "cpu"),
    ("rows-repetition-zero", lambda o: _sample(o, rows=_R(repetition=_T([1.0, 0.0, 1.0]))),
     "repetition_penalty: .*in row 1", "cpu"),
    ("rows-frequency-inf", lambda o: _sample(o, rows=_R(frequency=_T([INF, 0.0, 0.0]))),
     "frequency_penalty: .*in row 0", "cpu"),
    ("prev-int16", lambda o: _sample(o, prev=PREV.short()), "prev_tokens: expected int32 or int64", "both"),
    ("prev-float", lambda o: _sample(o, prev=PREV.float()), "prev_tokens: expected int32 or int64", "both"),
    ("prev-1d", lambda o: _sample(o, prev=PREV[0]), r"prev_tokens: expected shape \[3, n\]", "both"),
    ("prev-batch", lambda o: _sample(o, prev=PREV[:1]), r"prev_tokens: expected shape \[3, n\]", "both"),
    ("prev-meta", lambda o: _sample(o, prev=PREV.to(META)), "prev_tokens: expected a tensor on cpu", "cpu"),
    ("prev-id-vocab", lambda o: _sample(o, prev=_T([[0], [1], [11]]), repetition=2.0),
     r"prev_tokens: expected ids in \[0, 11\) or -1 .*found 11 at row 2", "cpu"),
    ("prev-id-negative", lambda o: _sample(o, prev=_T([[0], [-3], [1]])), "prev_tokens: .*found -3 at row 1", "cpu"),
    ("seed-float", lambda o: _sample(o, seed=_T([1.0])), "seed: expected an int64 tensor", "both"),
    ("seed-int32", lambda o: _sample(o, seed=_T([1], dtype=torch.int32)), "seed: expected an int64 tensor", "both"),
    ("seed-2d", lambda o: _sample(o, seed=_T([[1]])), r"seed: expected one element or one per row \[3\]", "both"),
    ("seed-rows-2d", lambda o: _sample(o, seed=_T([[1], [2], [3]])), "seed: expected one element or one per row", "both"),
    ("seed-length", lambda o: _sample(o, seed=_T([1, 2])), r"seed: expected one element or one per row \[3\]", "both"),
    ("seed-empty", lambda o: _sample(o, seed=torch.zeros(0, dtype=torch.long)), "seed: expected one element", "both"),
    ("seed-empty-batch0", lambda o: _sample(o, X[:0], seed=torch.zeros(0, dtype=torch.long)),
     r"seed: expected one element or one per row \[0\]", "both"),
    ("seed-meta", lambda o: _sample(o, seed=_T([1], device=META)), "seed: expected a CPU tensor or one on cpu", "cpu"),
    ("seed-rows-meta", lambda o: _sample(o, seed=_T([1, 2, 3], device=META)), "seed: expected a tensor on cpu", "cpu"),
    ("filter-logits-int", lambda o: _filter(o, X.int()), "logits: expected float32", "both"),
    ("filter-top_k-negative", lambda o: _filter(o, top_k=-2), "top_k: expected >= 0", "both"),
    ("filter-top_p-above-one", lambda o: _filter(o, top_p=1.0000001), "top_p: expected", "both"),
    ("filter-min_p-nan", lambda o: _filter(o, min_p=NAN), "min_p: expected", "both"),
    ("filter-rows-length", lambda o: _filter(o, rows=_R(top_k=torch.zeros(2, dtype=torch.long))),
     r"top_k: expected a per-row tensor of shape \[3\]", "both"),
    ("filter-rows-meta", lambda o: _filter(o, rows=_R(top_p=torch.ones(3, device=META))), "top_p: expected a tensor on",
     "cpu"),
    ("filter-rows-min_p-nan", lambda o: _filter(o, rows=_R(min_p=_T([NAN, 0.0, 0.0]))), "min_p: .*in row 0", "cpu"),
    ("spec-draft-2d", lambda o: _spec(o, draft=DRAFT[0]), "draft_probs: expected a 3-D tensor", "both"),
    ("spec-target-positions", lambda o: _spec(o, target=TARGET[:, :3]), r"target_probs: expected shape \[2, 4, 7\]",
     "both"),
    ("spec-ids-shape", lambda o: _spec(o, ids=IDS[:1]), r"draft_token_ids: expected shape \[2, 3\]", "both"),
    ("spec-draft-int", lambda o: _spec(o, draft=DRAFT.long(), target=TARGET.long()), "draft_probs: expected float32",
     "both"),
    ("spec-target-dtype", lambda o: _spec(o, target=TARGET.half()), "target_probs: expected the dtype of draft_probs",
     "both"),
    ("spec-ids-float", lambda o: _spec(o, ids=IDS.float()), "draft_token_ids: expected int32 or int64", "both"),
    ("spec-empty-vocab", lambda o: _spec(o, draft=DRAFT[..., :0], target=TARGET[..., :0]),
     "draft_probs: the vocabulary dimension is empty", "both"),
    ("spec-seed-int32", lambda o: _spec(o, seed=_T([3], dtype=torch.int32)), "seed: expected an int64 tensor", "both"),
    ("spec-seed-length", lambda o: _spec(o, seed=_T([3, 4, 5])), r"seed: expected one element or one per row \[2\]",
     "both"),
    ("spec-ids-meta", lambda o: _spec(o, ids=IDS.to(META)), "draft_token_ids: expected a tensor on cpu", "cpu"),
    ("spec-target-meta", lambda o: _spec(o, target=TARGET.to(META)), "target_probs: expected a tensor on cpu", "cpu"),
    ("spec-seed-meta", lambda o: _spec(o, seed=SEED.to(META)), "seed: expected a CPU tensor or one on cpu", "cpu"),
    ("unmask-logits-2d", lambda o: _unmask(o, UX[0]), "logits: expected a 3-D tensor", "both"),
    ("unmask-logits-int", lambda o: _unmask(o, UX.long()), "logits: expected float32", "both"),
    ("unmask-empty-vocab", lambda o: _unmask(o, UX[..., :0]), "logits: the vocabulary dimension is empty", "both"),
    ("unmask-tokens-float", lambda o: _unmask(o, tokens=UT.float()), "tokens: expected int32 or int64", "both"),
    ("unmask-tokens-shape", lambda o: _unmask(o, tokens=UT[:1]), r"tokens: expected shape \[2, 3\]", "both"),
    ("unmask-mask-id", lambda o: _unmask(o, mask=11), r"mask_token_id: expected an id in \[0, 11\), got 11", "both"),
    ("unmask-mask-id-negative", lambda o: _unmask(o, mask=-1), r"mask_token_id: expected an id in \[0, 11\)", "both"),
    ("unmask-num-reveal-negative", lambda o: _unmask(o, n=-3), "num_reveal: expected >= 0, got -3", "both"),
    ("unmask-num-reveal-rows-shape", lambda o: _unmask(o, n_rows=_T([1])), r"num_reveal: expected a per-row tensor of shape \[2\]",
     "both"),
    ("unmask-num-reveal-rows-float", lambda o: _unmask(o, n_rows=_T([1.0, 2.0])), "num_reveal: expected an integer tensor",
     "both"),
    ("unmask-num-reveal-rows-negative", lambda o: _unmask(o, n_rows=_T([1, -1])), "num_reveal: expected >= 0, got -1 in row 1",
     "cpu"),
    ("unmask-strategy", lambda o: _unmask(o, strategy="lowest"), "strategy: expected \"confidence\" or \"random\"", "both"),
    ("unmask-top_k-negative", lambda o: _unmask(o, top_k=-1), "top_k: expected >= 0", "both"),
    ("unmask-prev-shape", lambda o: _unmask(o, prev=_T([[1, 2]])), r"prev_tokens: expected shape \[2, n\]", "both"),
    ("unmask-prev-oov", lambda o: _unmask(o, prev=_T([[1], [12]])), r"prev_tokens: expected ids in \[0, 11\)", "cpu"),
    ("unmask-seed-length", lambda o: _unmask(o, seed=_T([3, 4, 5])), r"seed: expected one element or one per row \[2\]",
     "both"),
    ("unmask-tokens-meta", lambda o: _unmask(o, tokens=UT.to(META)), "tokens: expected a tensor on cpu", "cpu"),
]


def _raw_params(table):
    params = []
    for case_id, call, match, where in table:
        params.append(pytest.param(call, match, "cpu", id=f"cpu-{case_id}"))
        if where == "both":
            params.append(pytest.param(call, match, "emulated", id=f"emulated-{case_id}", marks=pytest.mark.emulated))
    return params


def _ops(backend):
    return OPS if backend == "cpu" else emulated_cuda.ops()


@pytest.mark.parametrize("call,match,backend", _raw_params(BAD_SAMPLING_RAW))
def test_bad_sampling_raw_ops(call, match, backend):
    with pytest.raises(RuntimeError, match=match):
        call(_ops(backend))


# ================================================================================================
# Denoising: wrappers
# ================================================================================================

BAD_DIFFUSION = [
    # noise_schedule
    ("schedule-kind", lambda: pk.noise_schedule("cosine"), ValueError, "kind: expected one of"),
    ("schedule-kind-none", lambda: pk.noise_schedule(None), ValueError, "kind: expected one of"),
    ("schedule-steps-zero", lambda: pk.noise_schedule("linear", 0), ValueError, "num_train_timesteps: expected a positive"),
    ("schedule-steps-float", lambda: pk.noise_schedule("linear", 10.0), ValueError, "num_train_timesteps"),
    ("schedule-steps-bool", lambda: pk.noise_schedule("linear", True), ValueError, "num_train_timesteps"),
    ("schedule-steps-huge", lambda: pk.noise_schedule("squaredcos_cap_v2", 2**40), ValueError,
     "num_train_timesteps: expected at most"),
    ("schedule-beta-nan", lambda: pk.noise_schedule("linear", 10, beta_end=NAN), ValueError, "beta_end: expected"),
    ("schedule-beta-negative", lambda: pk.noise_schedule("linear", 10, beta_start=-0.1), ValueError, "beta_start"),
    ("schedule-beta-inf", lambda: pk.noise_schedule("sigmoid", 10, beta_end=INF), ValueError, "beta_end"),
    ("schedule-beta-one", lambda: pk.noise_schedule("scaled_linear", 10, beta_end=1.0), ValueError,
     "betas must stay below 1"),
    ("schedule-rescale-str", lambda: pk.noise_schedule("linear", 10, rescale_zero_terminal_snr="no"), TypeError,
     "rescale_zero_terminal_snr: expected a bool"),
    ("schedule-rescale-one-step", lambda: pk.noise_schedule("linear", 1, rescale_zero_terminal_snr=True), ValueError,
     "rescale_zero_terminal_snr: needs at least 2"),
    ("schedule-rescale-flat", lambda: pk.noise_schedule("linear", 10, beta_start=0.0, beta_end=0.0,
                                                        rescale_zero_terminal_snr=True), ValueError,
     "rescale_zero_terminal_snr: every beta after the first is 0"),
    # add_noise
    ("add_noise-x0-int", lambda: pk.add_noise(S.long(), N, T2, ACP), TypeError, "x0: expected a float32"),
    ("add_noise-x0-0d", lambda: pk.add_noise(S[0, 0, 0], N[0, 0, 0], 3, ACP), ValueError, "x0: expected a tensor with a batch"),
    ("add_noise-x0-list", lambda: pk.add_noise(S.tolist(), N, T2, ACP), TypeError, "x0: expected a torch.Tensor"),
    ("add_noise-noise-list", lambda: pk.add_noise(S, N.tolist(), T2, ACP), TypeError, "noise: expected a torch.Tensor"),
    ("add_noise-noise-shape", lambda: pk.add_noise(S, N[:1], T2, ACP), ValueError, r"noise: expected shape \[2, 3, 4\]"),
    ("add_noise-noise-dtype", lambda: pk.add_noise(S, N.double(), T2, ACP), TypeError, "noise: expected dtype torch.float32"),
    ("add_noise-noise-meta", lambda: pk.add_noise(S, N.to(META), T2, ACP), ValueError, "noise: expected a tensor on cpu"),
    ("add_noise-target", lambda: pk.add_noise(S, N, T2, ACP, target="noise"), ValueError, "target: expected one of"),
    ("add_noise-acp-missing", lambda: pk.add_noise(S, N, T2), ValueError, "alphas_cumprod: required"),
    ("add_noise-acp-2d", lambda: pk.add_noise(S, N, T2, ACP[None]), ValueError, "alphas_cumprod: expected a non-empty 1-D"),
    ("add_noise-acp-empty", lambda: pk.add_noise(S, N, T2, ACP[:0]), ValueError, "alphas_cumprod: expected a non-empty"),
    ("add_noise-acp-int", lambda: pk.add_noise(S, N, T2, ACP.long()), TypeError, "alphas_cumprod: expected float64"),
    ("add_noise-acp-list", lambda: pk.add_noise(S, N, T2, ACP.tolist()), TypeError, "alphas_cumprod: expected a tensor"),
    ("add_noise-acp-meta", lambda: pk.add_noise(S, N, T2, ACP.to(META)), ValueError, "alphas_cumprod: expected a tensor on"),
    ("add_noise-acp-nan", lambda: pk.add_noise(S, N, T2, ACP.index_fill(0, _T([5]), NAN)), ValueError,
     r"alphas_cumprod: expected values in \[0, 1\], got nan at index 5"),
    ("add_noise-acp-above-one", lambda: pk.add_noise(S, N, T2, ACP + 1), ValueError, "alphas_cumprod: expected values in"),
    ("add_noise-t-float-tensor", lambda: pk.add_noise(S, N, T2.float(), ACP), TypeError,
     "timesteps: expected an integer tensor"),
    ("add_noise-t-bool", lambda: pk.add_noise(S, N, T2 > 5, ACP), TypeError, "timesteps: expected an integer tensor"),
    ("add_noise-t-uint8", lambda: pk.add_noise(S, N, T2.to(torch.uint8), ACP), TypeError,
     "timesteps: expected an integer tensor"),
    ("add_noise-t-fraction", lambda: pk.add_noise(S, N, 2.5, ACP), ValueError, "timesteps: expected an integer timestep"),
    ("add_noise-t-nan", lambda: pk.add_noise(S, N, NAN, ACP), ValueError, "timesteps: expected an integer timestep"),
    ("add_noise-t-inf", lambda: pk.add_noise(S, N, INF, ACP), ValueError, "timesteps: expected an integer timestep"),
    ("add_noise-t-str", lambda: pk.add_noise(S, N, "3", ACP), TypeError, "timesteps: expected a tensor or a number"),
    ("add_noise-t-huge", lambda: pk.add_noise(S, N, 2**70, ACP), ValueError, "timesteps: expected an int64 value"),
    ("add_noise-t-int64-max", lambda: pk.add_noise(S, N, 2**63 - 1, ACP), ValueError,
     "timesteps: expected values below 20 .*got 9223372036854775807"),
    ("add_noise-t-above", lambda: pk.add_noise(S, N, _T([3, 20]), ACP), ValueError,
     r"timesteps: expected values below 20 \(the length of alphas_cumprod\), got 20 at sample 1"),
    ("add_noise-t-negative", lambda: pk.add_noise(S, N, -1, ACP), ValueError, "timesteps: expected non-negative values, got -1"),
    ("add_noise-t-shape", lambda: pk.add_noise(S, N, _T([[3, 4]]), ACP), ValueError,
     r"timesteps: expected one value or one per sample \(2\)"),
    ("add_noise-t-length", lambda: pk.add_noise(S, N, _T([1, 2, 3]), ACP), ValueError, "timesteps: expected one value"),
    ("add_noise-t-empty", lambda: pk.add_noise(S, N, T2[:0], ACP), ValueError, "timesteps: expected one value"),
    ("add_noise-t-meta", lambda: pk.add_noise(S, N, T2.to(META), ACP), ValueError, "timesteps: expected a tensor on cpu"),
    ("add_noise-flow-nan", lambda: pk.add_noise(S, N, NAN, target="flow"), ValueError,
     r"timesteps: expected values in \[0, 1\], got nan"),
    ("add_noise-flow-above", lambda: pk.add_noise(S, N, _T([0.5, 1.5]), target="flow"), ValueError,
     "timesteps: expected values in .*got 1.5 at sample 1"),
    ("add_noise-flow-negative", lambda: pk.add_noise(S, N, -0.25, target="flow"), ValueError, "timesteps: expected values"),
    ("add_noise-flow-half", lambda: pk.add_noise(S, N, _T(0.5, dtype=torch.half), target="flow"), TypeError,
     "timesteps: expected a float32, float64 or integer tensor"),
    # diffusion_loss
    ("loss-pred-int", lambda: pk.diffusion_loss(S.int(), N), TypeError, "pred: expected a float32"),
    ("loss-pred-0d", lambda: pk.diffusion_loss(S.sum(), N.sum()), ValueError, "pred: expected a tensor with a batch"),
    ("loss-target-list", lambda: pk.diffusion_loss(S, N.tolist()), TypeError, "target: expected a torch.Tensor"),
    ("loss-target-shape", lambda: pk.diffusion_loss(S, N[:, :2]), ValueError, r"target: expected shape \[2, 3, 4\]"),
    ("loss-target-dtype", lambda: pk.diffusion_loss(S, N.half()), TypeError, "target: expected dtype"),
    ("loss-target-meta", lambda: pk.diffusion_loss(S, N.to(META)), ValueError, "target: expected a tensor on cpu"),
    ("loss-weighting", lambda: pk.diffusion_loss(S, N, weighting="snr"), ValueError, "weighting: expected one of"),
    ("loss-reduction", lambda: pk.diffusion_loss(S, N, reduction="sum"), ValueError, "reduction: expected one of"),
    ("loss-prediction", lambda: pk.diffusion_loss(S, N, prediction_type="flow_prediction"), ValueError,
     "prediction_type: expected one of"),
    ("loss-gamma-zero", lambda: pk.diffusion_loss(S, N, T2, ACP, weighting="min_snr", gamma=0.0), ValueError,
     "gamma: expected a finite value > 0"),
    ("loss-gamma-nan", lambda: pk.diffusion_loss(S, N, gamma=NAN), ValueError, "gamma: expected a finite value > 0"),
    ("loss-gamma-inf", lambda: pk.diffusion_loss(S, N, gamma=INF), ValueError, "gamma: expected a finite value > 0"),
    ("loss-gamma-str", lambda: pk.diffusion_loss(S, N, gamma="5"), TypeError, "gamma: expected a float"),
    ("loss-min_snr-no-t", lambda: pk.diffusion_loss(S, N, weighting="min_snr"), ValueError, "timesteps/alphas_cumprod"),
    ("loss-t-above", lambda: pk.diffusion_loss(S, N, _T([0, 99]), ACP, weighting="min_snr"), ValueError,
     "timesteps: expected values below 20"),
    ("loss-t-float", lambda: pk.diffusion_loss(S, N, T2.double(), ACP, weighting="min_snr"), TypeError,
     "timesteps: expected an integer tensor"),
    # ddpm_step
    ("ddpm-sample-int", lambda: pk.ddpm_step(MO, S.long(), T2, T2 - 1, ACP), TypeError, "sample: expected a float32"),
    ("ddpm-sample-list", lambda: pk.ddpm_step(MO, S.tolist(), T2, T2 - 1, ACP), TypeError, "sample: expected a torch.Tensor"),
    ("ddpm-mo-shape", lambda: pk.ddpm_step(MO[:, :1], S, T2, T2 - 1, ACP), ValueError, "model_output: expected shape"),
    ("ddpm-mo-dtype", lambda: pk.ddpm_step(MO.double(), S, T2, T2 - 1, ACP), TypeError, "model_output: expected dtype"),
    ("ddpm-mo-meta", lambda: pk.ddpm_step(MO.to(META), S, T2, T2 - 1, ACP), ValueError, "model_output: expected a tensor on"),
    ("ddpm-t-above", lambda: pk.ddpm_step(MO, S, 20, 19, ACP), ValueError, "timesteps: expected values below 20"),
    ("ddpm-t-negative", lambda: pk.ddpm_step(MO, S, _T([-1, 3]), -1, ACP), ValueError, "timesteps: expected non-negative"),
    ("ddpm-prev-above", lambda: pk.ddpm_step(MO, S, 5, 20, ACP), ValueError, "prev_timesteps: expected values below 20"),
    ("ddpm-prev-float", lambda: pk.ddpm_step(MO, S, 5, 4.5, ACP), ValueError, "prev_timesteps: expected an integer"),
    ("ddpm-prediction", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, prediction_type="eps"), ValueError,
     "prediction_type: expected one of"),
    ("ddpm-variance", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, variance_type="learned"), ValueError,
     "variance_type: expected one of"),
    ("ddpm-clip-range-nan", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, clip_sample_range=NAN), ValueError,
     "clip_sample_range: expected a finite value > 0"),
    ("ddpm-clip-range-zero", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, clip_sample_range=0.0), ValueError,
     "clip_sample_range: expected a finite value > 0"),
    ("ddpm-clip-range-str", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, clip_sample=False, clip_sample_range="1"),
     TypeError, "clip_sample_range: expected a float"),
    ("ddpm-noise-shape", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, noise=N[:1]), ValueError, "noise: expected shape"),
    ("ddpm-noise-and-seed", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, noise=N, seed=1), ValueError,
     "noise: pass either a noise tensor or seed"),
    ("ddpm-seed-float", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, seed=0.5), TypeError, "seed: expected an int"),
    ("ddpm-seed-tensor-shape", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, seed=_T([1, 2])), ValueError,
     r"seed: expected one element, got a tensor of shape \(2,\)"),
    ("ddpm-seed-meta", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, seed=_T([1], device=META)), ValueError,
     "seed: expected a CPU tensor"),
    ("ddpm-seed-too-big", lambda: pk.ddpm_step(MO, S, 5, 4, ACP, seed=2**64), ValueError, "seed: expected a value in"),
    # ddim_step
    ("ddim-eta-negative", lambda: pk.ddim_step(MO, S, 5, 4, ACP, eta=-0.1), ValueError, "eta: expected a finite value >= 0"),
    ("ddim-eta-nan", lambda: pk.ddim_step(MO, S, 5, 4, ACP, eta=NAN), ValueError, "eta: expected a finite value >= 0"),
    ("ddim-eta-inf", lambda: pk.ddim_step(MO, S, 5, 4, ACP, eta=INF), ValueError, "eta: expected a finite value >= 0"),
    ("ddim-final-alpha-zero", lambda: pk.ddim_step(MO, S, 5, -1, ACP, final_alpha_cumprod=0.0), ValueError,
     r"final_alpha_cumprod: expected a value in \(0, 1\]"),
    ("ddim-final-alpha-above", lambda: pk.ddim_step(MO, S, 5, -1, ACP, final_alpha_cumprod=1.5), ValueError,
     "final_alpha_cumprod"),
    ("ddim-t-above", lambda: pk.ddim_step(MO, S, _T([19, 25]), 4, ACP), ValueError,
     "timesteps: expected values below 20 .*got 25 at sample 1"),
    ("ddim-noise-unused-shape", lambda: pk.ddim_step(MO, S, 5, 4, ACP, noise=N[:, :1]), ValueError,
     "noise: expected shape"),
    ("ddim-acp-negative", lambda: pk.ddim_step(MO, S, 5, 4, ACP - 2), ValueError, "alphas_cumprod: expected values in"),
    # euler_step
    ("euler-sigma-zero", lambda: pk.euler_step(MO, S, 0.0, 0.0), ValueError, "sigma: expected finite values > 0, got 0.0"),
    ("euler-sigma-negative", lambda: pk.euler_step(MO, S, -1.0, 0.0), ValueError, "sigma: expected finite values > 0"),
    ("euler-sigma-nan", lambda: pk.euler_step(MO, S, NAN, 0.0), ValueError, "sigma: expected finite values > 0, got nan"),
    ("euler-sigma-inf", lambda: pk.euler_step(MO, S, INF, 1.0), ValueError, "sigma: expected finite values > 0, got inf"),
    ("euler-sigma-row-nan", lambda: pk.euler_step(MO, S, _T([1.0, NAN]), 0.5), ValueError,
     "sigma: expected finite values > 0, got nan at sample 1"),
    ("euler-sigma_next-negative", lambda: pk.euler_step(MO, S, 1.0, -0.5), ValueError,
     "sigma_next: expected finite values >= 0"),
    ("euler-sigma_next-nan", lambda: pk.euler_step(MO, S, 1.0, NAN), ValueError, "sigma_next: expected finite values >= 0"),
    ("euler-sigma-bool", lambda: pk.euler_step(MO, S, True, 0.0), TypeError, "sigma: expected a tensor or a number"),
    ("euler-sigma-str", lambda: pk.euler_step(MO, S, "1", 0.0), TypeError, "sigma: expected a tensor or a number"),
    ("euler-sigma-bool-tensor", lambda: pk.euler_step(MO, S, _T([True, True]), 0.0), TypeError,
     "sigma: expected a float32, float64 or integer tensor"),
    ("euler-sigma-shape", lambda: pk.euler_step(MO, S, torch.ones(2, 1), 0.0), ValueError,
     r"sigma: expected one value or one per sample \(2\)"),
    ("euler-sigma-meta", lambda: pk.euler_step(MO, S, SIG.to(META), 0.0), ValueError, "sigma: expected a tensor on cpu"),
    ("euler-s_churn-negative", lambda: pk.euler_step(MO, S, 1.0, 0.5, s_churn=-1.0, num_inference_steps=4), ValueError,
     "s_churn: expected a finite value >= 0"),
    ("euler-s_churn-nan", lambda: pk.euler_step(MO, S, 1.0, 0.5, s_churn=NAN, num_inference_steps=4), ValueError,
     "s_churn"),
    ("euler-steps-zero", lambda: pk.euler_step(MO, S, 1.0, 0.5, s_churn=1.0, num_inference_steps=0), ValueError,
     "num_inference_steps: expected a positive int"),
    ("euler-steps-missing", lambda: pk.euler_step(MO, S, 1.0, 0.5, s_churn=1.0), ValueError,
     "num_inference_steps: required"),
    ("euler-gamma-inf", lambda: pk.euler_step(MO, S, 1.0, 0.5, gamma=INF), ValueError, "gamma: expected a finite value"),
    ("euler-s_noise-inf", lambda: pk.euler_step(MO, S, 1.0, 0.5, s_noise=INF), ValueError, "s_noise: expected a finite"),
    ("euler-s_tmin-nan", lambda: pk.euler_step(MO, S, 1.0, 0.5, s_tmin=NAN), ValueError, "s_tmin: expected a number"),
    ("euler-mo-shape", lambda: pk.euler_step(MO[:1], S, 1.0, 0.5), ValueError, "model_output: expected shape"),
    # heun_step
    ("heun-sigma-zero", lambda: pk.heun_step(MO, S, 0.0, 0.0), ValueError, "sigma: expected finite values > 0"),
    ("heun-second-sigma_next-zero", lambda: pk.heun_step(MO, S, 1.0, 0.0, prev_derivative=N, prev_sample=S),
     ValueError, "sigma_next: expected finite values > 0"),
    ("heun-sigma-nan", lambda: pk.heun_step(MO, S, NAN, 0.5), ValueError, "sigma: expected finite values > 0"),
    ("heun-prev-one", lambda: pk.heun_step(MO, S, 1.0, 0.5, prev_derivative=N), ValueError,
     "prev_derivative/prev_sample: pass both"),
    ("heun-prev_sample-shape", lambda: pk.heun_step(MO, S, 1.0, 0.5, prev_derivative=N, prev_sample=S[:1]), ValueError,
     "prev_sample: expected shape"),
    ("heun-prev_derivative-dtype", lambda: pk.heun_step(MO, S, 1.0, 0.5, prev_derivative=N.half(), prev_sample=S),
     TypeError, "prev_derivative: expected dtype"),
    ("heun-clip-range-inf", lambda: pk.heun_step(MO, S, 1.0, 0.5, clip_sample=True, clip_sample_range=INF),
     ValueError, "clip_sample_range: expected a finite value > 0"),
    # dpmpp_2m_step
    ("dpm-sigma-zero", lambda: pk.dpmpp_2m_step(MO, S, 0.0, 0.0), ValueError, "sigma: expected finite values > 0"),
    ("dpm-sigma-nan", lambda: pk.dpmpp_2m_step(MO, S, NAN, 0.5), ValueError, "sigma: expected finite values > 0"),
    ("dpm-sigma-inf", lambda: pk.dpmpp_2m_step(MO, S, INF, 0.5), ValueError, "sigma: expected finite values > 0"),
    ("dpm-sigma_next-negative", lambda: pk.dpmpp_2m_step(MO, S, 1.0, -0.5), ValueError,
     "sigma_next: expected finite values >= 0"),
    ("dpm-sigma_prev-zero", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, prev_x0=S, sigma_prev=0.0), ValueError,
     "sigma_prev: expected finite values > 0"),
    ("dpm-sigma_prev-equal", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, prev_x0=S, sigma_prev=1.0), ValueError,
     r"sigma_prev: expected a value other than sigma \(1.0\)"),
    ("dpm-sigma_prev-equal-row", lambda: pk.dpmpp_2m_step(MO, S, SIG, 0.5, prev_x0=S, sigma_prev=_T([3.0, 1.5])),
     ValueError, "sigma_prev: expected a value other than sigma .*at sample 1"),
    ("dpm-prev_x0-alone", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, prev_x0=S), ValueError, "prev_x0/sigma_prev"),
    ("dpm-prev_x0-shape", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, prev_x0=S[:1], sigma_prev=2.0), ValueError,
     "prev_x0: expected shape"),
    ("dpm-flow-sigma-above", lambda: pk.dpmpp_2m_step(MO, S, 1.5, 0.5, flow_sigmas=True), ValueError,
     r"sigma: expected values in \[0, 1\] with flow_sigmas=True, got 1.5"),
    ("dpm-flow-sigma_next-nan", lambda: pk.dpmpp_2m_step(MO, S, 0.5, _T([0.2, NAN]), flow_sigmas=True), ValueError,
     "sigma_next: expected values in .*got nan at sample 1"),
    ("dpm-algorithm", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, algorithm_type="dpmsolver"), ValueError,
     "algorithm_type: expected one of"),
    ("dpm-solver", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, solver_type="bh2"), ValueError, "solver_type: expected"),
    ("dpm-prediction", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, prediction_type="x0"), ValueError, "prediction_type"),
    ("dpm-sde-seed-bad", lambda: pk.dpmpp_2m_step(MO, S, 1.0, 0.5, algorithm_type="sde-dpmsolver++", seed="s"),
     TypeError, "seed: expected an int"),
    # flow_match_step
    ("flow-sigma-nan", lambda: pk.flow_match_step(MO, S, NAN, 0.5), ValueError, r"sigma: expected values in \[0, 1\]"),
    ("flow-sigma-huge", lambda: pk.flow_match_step(MO, S, 1e300, 0.5), ValueError, "sigma: expected values in"),
    ("flow-sigma_next-negative", lambda: pk.flow_match_step(MO, S, 0.5, -0.1), ValueError, "sigma_next: expected values"),
    ("flow-sigma_next-row-inf", lambda: pk.flow_match_step(MO, S, 0.5, _T([0.2, INF])), ValueError,
     "sigma_next: expected values in .*got inf at sample 1"),
    ("flow-mo-list", lambda: pk.flow_match_step(MO.tolist(), S, 0.5, 0.2), TypeError,
     "model_output: expected a torch.Tensor"),
    ("flow-noise-shape", lambda: pk.flow_match_step(MO, S, 0.5, 0.2, stochastic=True, noise=N[:1]), ValueError,
     "noise: expected shape"),
    ("flow-noise-unused-dtype", lambda: pk.flow_match_step(MO, S, 0.5, 0.2, noise=N.double()), TypeError,
     "noise: expected dtype"),
    ("flow-sample-0d", lambda: pk.flow_match_step(MO, S.sum(), 0.5, 0.2), ValueError, "sample: expected a tensor with a batch"),
    # sample_timesteps, shift_sigmas
    ("timesteps-batch-zero", lambda: pk.sample_timesteps(0), ValueError, "batch_size: expected a positive int"),
    ("timesteps-batch-float", lambda: pk.sample_timesteps(2.0), ValueError, "batch_size: expected a positive int"),
    ("timesteps-kind", lambda: pk.sample_timesteps(2, kind="beta"), ValueError, "kind: expected one of"),
    ("timesteps-n-zero", lambda: pk.sample_timesteps(2, num_train_timesteps=0), ValueError, "num_train_timesteps"),
    ("timesteps-shift-zero", lambda: pk.sample_timesteps(2, kind="logit_normal", shift=0.0), ValueError,
     "shift: expected a finite value > 0"),
    ("timesteps-shift-nan", lambda: pk.sample_timesteps(2, kind="mode", shift=NAN), ValueError, "shift"),
    ("timesteps-logit_std-negative", lambda: pk.sample_timesteps(2, kind="logit_normal", logit_std=-1.0), ValueError,
     "logit_std"),
    ("timesteps-logit_mean-inf", lambda: pk.sample_timesteps(2, kind="logit_normal", logit_mean=INF), ValueError,
     "logit_mean"),
    ("timesteps-mode_scale-huge", lambda: pk.sample_timesteps(2, kind="mode", mode_scale=1e300), ValueError,
     r"mode_scale: expected a value in \[-1, 1.75"),
    ("timesteps-mode_scale-nan", lambda: pk.sample_timesteps(2, kind="mode", mode_scale=NAN), ValueError, "mode_scale"),
    ("shift-zero", lambda: pk.shift_sigmas(_T([0.5]), 0.0), ValueError, "shift: expected a finite value > 0"),
    ("shift-negative", lambda: pk.shift_sigmas(_T([0.5]), -2.0), ValueError, "shift: expected a finite value > 0"),
    ("shift-nan", lambda: pk.shift_sigmas(0.5, NAN), ValueError, "shift"),
    ("shift-str", lambda: pk.shift_sigmas(0.5, "3"), TypeError, "shift: expected a float"),
    ("shift-sigmas-above", lambda: pk.shift_sigmas(_T([0.5, 2.0]), 3.0), ValueError,
     r"sigmas: expected values in \[0, 1\], got 2.0 at index 1"),
    ("shift-sigmas-nan-number", lambda: pk.shift_sigmas(NAN, 3.0), ValueError, "sigmas: expected a finite value"),
    ("shift-sigmas-list", lambda: pk.shift_sigmas([0.5], 3.0), TypeError, "sigmas: expected a float"),
    ("shift-sigmas-bool-tensor", lambda: pk.shift_sigmas(_T([True]), 3.0), TypeError, "sigmas: expected a floating"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_DIFFUSION], ids=_ids(BAD_DIFFUSION))
def test_bad_diffusion_wrappers(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_moved_checks_are_still_runtime_errors():
    # Shape and range checks that the ops made before the wrappers did stay catchable as
    # RuntimeError (the errors are also ValueError / TypeError).
    for call in (lambda: pk.add_noise(S, N, _T([3, 99]), ACP), lambda: pk.ddim_step(MO[:1], S, 5, 4, ACP),
                 lambda: pk.euler_step(MO.double(), S, 1.0, 0.5), lambda: pk.add_noise(S, N, _T([1, 2, 3]), ACP)):
        with pytest.raises(RuntimeError):
            call()


# ================================================================================================
# Denoising: raw ops
# ================================================================================================

BAD_DIFFUSION_RAW = [
    ("add_noise-x0-0d", lambda o: _add_noise(o, S.sum(), N.sum(), _T(3)), "x0: expected a batch dimension", "both"),
    ("add_noise-x0-int", lambda o: _add_noise(o, S.long(), N.long()), "x0: expected float32", "both"),
    ("add_noise-noise-shape", lambda o: _add_noise(o, noise=N[:1]), r"noise: expected shape \[2, 3, 4\]", "both"),
    ("add_noise-noise-dtype", lambda o: _add_noise(o, noise=N.double()), "noise: expected dtype Float", "both"),
    ("add_noise-noise-meta", lambda o: _add_noise(o, noise=N.to(META)), "noise: expected a tensor on cpu", "cpu"),
    ("add_noise-target", lambda o: _add_noise(o, target="x0"), "target: expected 'epsilon'", "both"),
    ("add_noise-acp-missing", lambda o: _add_noise(o, acp=None), "alphas_cumprod: required for target 'epsilon'", "both"),
    ("add_noise-acp-2d", lambda o: _add_noise(o, acp=ACP[None]), "alphas_cumprod: expected a non-empty 1-D table", "both"),
    ("add_noise-acp-int", lambda o: _add_noise(o, acp=ACP.long()), "alphas_cumprod: expected float64", "both"),
    ("add_noise-acp-nan", lambda o: _add_noise(o, acp=torch.full((20,), NAN, dtype=torch.float64)),
     r"alphas_cumprod: expected values in \[0, 1\], got nan at index 0", "both"),
    ("add_noise-acp-negative", lambda o: _add_noise(o, acp=-ACP), "alphas_cumprod: expected values in", "both"),
    ("add_noise-acp-meta", lambda o: _add_noise(o, acp=ACP.to(META)), "alphas_cumprod: expected a tensor on cpu", "cpu"),
    ("add_noise-t-uint8", lambda o: _add_noise(o, t=T2.to(torch.uint8)), "timesteps: expected an int32 or int64", "both"),
    ("add_noise-t-float", lambda o: _add_noise(o, t=T2.float()), "timesteps: expected an int32 or int64", "both"),
    ("add_noise-t-shape", lambda o: _add_noise(o, t=T2[None]), r"timesteps: expected one value or one per sample \(2\)",
     "both"),
    ("add_noise-t-above", lambda o: _add_noise(o, t=_T([0, 20])),
     r"timesteps: expected values below 20 \(the length of alphas_cumprod\), got 20 at sample 1", "both"),
    ("add_noise-t-int64-max", lambda o: _add_noise(o, t=_T(2**63 - 1)), "timesteps: .*got 9223372036854775807", "both"),
    ("add_noise-t-int32-min", lambda o: _add_noise(o, t=_T(-(2**31), dtype=torch.int32)),
     "timesteps: expected non-negative values, got -2147483648", "both"),
    ("add_noise-t-meta", lambda o: _add_noise(o, t=T2.to(META)), "timesteps: expected a tensor on cpu", "cpu"),
    ("add_noise-flow-nan", lambda o: _add_noise(o, t=_T([0.5, NAN]), acp=None, target="flow"),
     r"timesteps: expected values in \[0, 1\], got nan at sample 1", "both"),
    ("add_noise-flow-above", lambda o: _add_noise(o, t=_T(1.25), acp=None, target="flow"), "timesteps: expected values",
     "both"),
    ("add_noise-flow-half", lambda o: _add_noise(o, t=_T(0.5, dtype=torch.half), acp=None, target="flow"),
     "timesteps: expected a float32, float64 or integer tensor", "both"),
    ("loss-weighting", lambda o: _loss(o, weighting="snr"), "weighting: expected 'none' or 'min_snr'", "both"),
    ("loss-gamma-zero", lambda o: _loss(o, gamma=0.0), "gamma: expected a finite value > 0", "both"),
    ("loss-gamma-nan", lambda o: _loss(o, gamma=NAN), "gamma: expected a finite value > 0", "both"),
    ("loss-prediction", lambda o: _loss(o, pt="flow_prediction"), "prediction_type: expected", "both"),
    ("loss-target-shape", lambda o: _loss(o, target=N[:1]), "target: expected shape", "both"),
    ("loss-target-meta", lambda o: _loss(o, target=N.to(META)), "target: expected a tensor on cpu", "cpu"),
    ("loss-min_snr-no-t", lambda o: _loss(o, weighting="min_snr"), "timesteps: required for weighting 'min_snr'", "both"),
    ("loss-t-above", lambda o: _loss(o, t=_T([1, 20]), acp=ACP, weighting="min_snr"),
     "timesteps: expected values below 20", "both"),
    ("loss_bwd-grad-shape", lambda o: _loss_bwd(o, grad=torch.ones(2, 1)), r"grad: expected shape \[2\]", "both"),
    ("loss_bwd-grad-half", lambda o: _loss_bwd(o, grad=torch.ones(2, dtype=torch.half)),
     "grad: expected a float32, float64 or integer tensor", "both"),
    ("loss_bwd-grad-meta", lambda o: _loss_bwd(o, grad=torch.ones(2, device=META)), "grad: expected a tensor on cpu", "cpu"),
    ("loss_bwd-gamma-inf", lambda o: _loss_bwd(o, gamma=INF), "gamma: expected a finite value > 0", "both"),
    ("loss_bwd-t-negative", lambda o: _loss_bwd(o, t=_T(-3), acp=ACP, weighting="min_snr"),
     "timesteps: expected non-negative values, got -3", "both"),
    ("ddpm-no-noise-no-seed", lambda o: _ddpm(o, noise=None), "seed: this step draws noise", "both"),
    ("ddpm-seed-int32", lambda o: _ddpm(o, noise=None, seed=_T([1], dtype=torch.int32)),
     "seed: expected a one-element int64 tensor", "both"),
    ("ddpm-seed-two", lambda o: _ddpm(o, noise=None, seed=_T([1, 2])), "seed: expected a one-element int64", "both"),
    ("ddpm-seed-meta", lambda o: _ddpm(o, noise=None, seed=SEED.to(META)), "seed: expected a tensor on cpu", "cpu"),
    ("ddpm-variance", lambda o: _ddpm(o, var="learned_range"), "variance_type: expected", "both"),
    ("ddpm-prediction", lambda o: _ddpm(o, pt="flow_prediction"), "prediction_type: expected", "both"),
    ("ddpm-clip-range-inf", lambda o: _ddpm(o, rng=INF), "clip_sample_range: expected a finite value > 0, got inf", "both"),
    ("ddpm-t-above", lambda o: _ddpm(o, t=_T(20)), "timesteps: expected values below 20", "both"),
    ("ddpm-prev-above", lambda o: _ddpm(o, prev=_T([2, 20])), "prev_timesteps: expected values below 20 .*sample 1",
     "both"),
    ("ddpm-mo-shape", lambda o: _ddpm(o, mo=MO[:1]), "model_output: expected shape", "both"),
    ("ddpm-mo-meta", lambda o: _ddpm(o, mo=MO.to(META)), "model_output: expected a tensor on cpu", "cpu"),
    ("ddpm-acp-above-one", lambda o: _ddpm(o, acp=ACP * 2), r"alphas_cumprod: expected values in \[0, 1\]", "both"),
    ("ddim-eta-negative", lambda o: _ddim(o, eta=-1.0), "eta: expected a finite value >= 0", "both"),
    ("ddim-eta-nan", lambda o: _ddim(o, eta=NAN), "eta: expected a finite value >= 0", "both"),
    ("ddim-final-alpha-zero", lambda o: _ddim(o, final=0.0), r"final_alpha_cumprod: expected a value in \(0, 1\]", "both"),
    ("ddim-final-alpha-nan", lambda o: _ddim(o, final=NAN), "final_alpha_cumprod: expected", "both"),
    ("ddim-t-negative", lambda o: _ddim(o, t=_T([-1, 5])), "timesteps: expected non-negative values", "both"),
    ("ddim-noise-unused-shape", lambda o: _ddim(o, noise=N[:1]), "noise: expected shape", "both"),
    ("euler-churn-negative", lambda o: _euler(o, churn=-0.5), "churn_gamma: expected a finite value >= 0", "both"),
    ("euler-s_tmin-nan", lambda o: _euler(o, tmin=NAN), "s_tmin: expected a number", "both"),
    ("euler-s_noise-nan", lambda o: _euler(o, snoise=NAN), "s_noise: expected a finite value", "both"),
    ("euler-sigma-zero", lambda o: _euler(o, sigma=_T(0.0)), "sigma: expected finite values > 0, got 0", "both"),
    ("euler-sigma-row-nan", lambda o: _euler(o, sigma=_T([1.0, NAN])), "sigma: expected finite values > 0, got nan at sample 1",
     "both"),
    ("euler-sigma_next-inf", lambda o: _euler(o, sigma_next=_T(INF)), "sigma_next: expected finite values >= 0", "both"),
    ("euler-sigma-bool", lambda o: _euler(o, sigma=_T(True)), "sigma: expected a float32, float64 or integer", "both"),
    ("euler-sigma-meta", lambda o: _euler(o, sigma=SIG.to(META)), "sigma: expected a tensor on cpu", "cpu"),
    ("euler-churn-no-seed", lambda o: _euler(o, churn=0.3), "seed: this step draws noise", "both"),
    ("heun-prev-one", lambda o: _heun(o, dprev=N), "prev_derivative/prev_sample: pass both", "both"),
    ("heun-sigma-zero", lambda o: _heun(o, sigma=_T(0.0)), "sigma: expected finite values > 0", "both"),
    ("heun-second-sigma_next-zero", lambda o: _heun(o, sigma_next=_T(0.0), dprev=N, sprev=S),
     "sigma_next: expected finite values > 0", "both"),
    ("heun-prev_sample-shape", lambda o: _heun(o, dprev=N, sprev=S[:1]), "prev_sample: expected shape", "both"),
    ("heun-clip-range-zero", lambda o: _heun(o, clip=True, rng=0.0), "clip_sample_range: expected a finite value > 0",
     "both"),
    ("dpm-order", lambda o: _dpm(o, order=3), "order: expected 1 or 2, got 3", "both"),
    ("dpm-algorithm", lambda o: _dpm(o, algo="dpmsolver"), "algorithm_type: expected", "both"),
    ("dpm-solver", lambda o: _dpm(o, solver="bh1"), "solver_type: expected", "both"),
    ("dpm-order2-no-prev", lambda o: _dpm(o, order=2), "prev_x0: required for a second order step", "both"),
    ("dpm-order2-no-sigma_prev", lambda o: _dpm(o, order=2, prev_x0=S), "sigma_prev: required", "both"),
    ("dpm-sigma-zero", lambda o: _dpm(o, sigma=_T(0.0)), "sigma: expected finite values > 0", "both"),
    ("dpm-sigma_prev-equal", lambda o: _dpm(o, order=2, prev_x0=S, sigma_prev=_T([2.0, 9.0])),
     r"sigma_prev: expected a value other than sigma \(2\) at sample 0", "both"),
    ("dpm-flow-sigma-above", lambda o: _dpm(o, sigma=_T(1.5), pt="flow_prediction", flow=True),
     r"sigma: expected values in \[0, 1\] with flow_sigmas=True, got 1.5", "both"),
    ("dpm-sde-no-seed", lambda o: _dpm(o, algo="sde-dpmsolver++"), "seed: this step draws noise", "both"),
    ("dpm-prev_x0-meta", lambda o: _dpm(o, order=2, prev_x0=S.to(META), sigma_prev=_T(3.0)),
     "prev_x0: expected a tensor on cpu", "cpu"),
    ("flow-stochastic-no-seed", lambda o: _flow(o, stochastic=True), "seed: this step draws noise", "both"),
    ("flow-sigma-nan", lambda o: _flow(o, sigma=_T([NAN, 0.5])), r"sigma: expected values in \[0, 1\], got nan at sample 0",
     "both"),
    ("flow-sigma_next-above", lambda o: _flow(o, sigma_next=_T(2.0)), "sigma_next: expected values in", "both"),
    ("flow-noise-unused-shape", lambda o: _flow(o, noise=N[:1]), "noise: expected shape", "both"),
    ("flow-sample-int", lambda o: _flow(o, mo=MO.long(), x=S.long()), "sample: expected float32", "both"),
    ("flow-sigma-length", lambda o: _flow(o, sigma=_T([0.5, 0.5, 0.5])), r"sigma: expected one value or one per sample",
     "both"),
]


@pytest.mark.parametrize("call,match,backend", _raw_params(BAD_DIFFUSION_RAW))
def test_bad_diffusion_raw_ops(call, match, backend):
    with pytest.raises(RuntimeError, match=match):
        call(_ops(backend))


# ================================================================================================
# Schedulers
# ================================================================================================

SCHED = pk.schedulers


def _stepped(cls, n=3, extra=0, **kw):
    s = cls(num_train_timesteps=40, **kw)
    s.set_timesteps(n)
    x = S
    for t in list(s.timesteps) + [s.timesteps[-1]] * extra:
        x = s.step(MO, t, x).prev_sample
    return x


def _set(cls, *args, init=None, **kw):
    s = cls(num_train_timesteps=40, **(init or {}))
    s.set_timesteps(*args, **kw)
    return s


def _step_with(cls, timestep=None, sample=S, mo=MO, **init):
    s = cls(num_train_timesteps=40, **init)
    s.set_timesteps(3)
    return s.step(mo, s.timesteps[0] if timestep is None else timestep, sample)


_ALL = [("ddpm", SCHED.DDPMScheduler), ("ddim", SCHED.DDIMScheduler), ("euler", SCHED.EulerDiscreteScheduler),
        ("flow", SCHED.FlowMatchEulerDiscreteScheduler), ("dpm", SCHED.DPMSolverMultistepScheduler)]
_SIGMA = [c for c in _ALL if c[0] in ("euler", "flow", "dpm")]

BAD_SCHEDULERS = []
for _n, _c in _ALL:
    BAD_SCHEDULERS += [
        (f"{_n}-train-steps-zero", lambda c=_c: c(num_train_timesteps=0), ValueError, "num_train_timesteps"),
        (f"{_n}-train-steps-float", lambda c=_c: c(num_train_timesteps=1.5), ValueError, "num_train_timesteps"),
        (f"{_n}-steps-zero", lambda c=_c: _set(c, 0), ValueError, "num_inference_steps: expected a positive int"),
        (f"{_n}-steps-float", lambda c=_c: _set(c, 2.5), ValueError, "num_inference_steps: expected a positive int"),
        (f"{_n}-steps-bool", lambda c=_c: _set(c, True), ValueError, "num_inference_steps: expected a positive int"),
        (f"{_n}-steps-too-many", lambda c=_c: _set(c, 41), ValueError, "num_inference_steps: 41 is larger"),
        (f"{_n}-step-timestep-str", lambda c=_c: _step_with(c, "1"), TypeError, "timestep: expected a number or a tensor"),
        (f"{_n}-step-timestep-empty", lambda c=_c: _step_with(c, torch.zeros(0)), ValueError,
         "timestep: expected a number or a non-empty tensor"),
        (f"{_n}-step-timestep-nan", lambda c=_c: _step_with(c, NAN), ValueError, "timestep: expected a number, got nan"),
        (f"{_n}-step-sample-list", lambda c=_c: _step_with(c, sample=S.tolist()), TypeError,
         "sample: expected a torch.Tensor"),
        (f"{_n}-step-mo-shape", lambda c=_c: _step_with(c, mo=MO[:1]), ValueError, "model_output: expected shape"),
    ]
    if _n != "flow":
        BAD_SCHEDULERS += [
            (f"{_n}-beta-nan", lambda c=_c: c(beta_end=NAN), ValueError, "beta_end: expected"),
            (f"{_n}-beta-schedule", lambda c=_c: c(beta_schedule="exp"), ValueError, "beta_schedule"),
            (f"{_n}-prediction", lambda c=_c: c(prediction_type="x0"), ValueError, "prediction_type: expected one of"),
            (f"{_n}-add_noise-t-above", lambda c=_c: _set(c, 3).add_noise(S, N, _T([1, 99])), ValueError, "timesteps"),
        ]
for _n, _c in _SIGMA:
    BAD_SCHEDULERS += [
        (f"{_n}-step-past-end", lambda c=_c: _stepped(c, extra=1), ValueError,
         "step: step index 3 is past the 3 steps of the schedule"),
        (f"{_n}-step-timestep-not-in-schedule", lambda c=_c: _step_with(c, _T(13.37)), ValueError,
         "timestep: 13.3.* is not in the schedule"),
        (f"{_n}-begin-index-past-end", lambda c=_c: (lambda s: (s.set_timesteps(3), s.set_begin_index(7),
                                                                 s.step(MO, s.timesteps[0], S)))(c(num_train_timesteps=40)),
         ValueError, "step: step index 7 is past"),
    ]
BAD_SCHEDULERS += [
    ("ddpm-step-timestep-not-in-schedule", lambda: _step_with(SCHED.DDPMScheduler, 14), ValueError,
     "timestep: 14 is not in the schedule"),
    ("ddpm-step-timestep-fraction", lambda: _step_with(SCHED.DDPMScheduler, 13.5), ValueError,
     "timestep: expected an integer timestep"),
    ("ddpm-custom-timesteps-nan", lambda: _set(SCHED.DDPMScheduler, timesteps=[30, NAN]), ValueError,
     r"timesteps: expected integers in \[0, 39\], got nan at index 1"),
    ("ddpm-custom-timesteps-empty", lambda: _set(SCHED.DDPMScheduler, timesteps=[]), ValueError,
     "timesteps: expected a 1-D sequence of at least 1"),
    ("ddpm-custom-timesteps-2d", lambda: _set(SCHED.DDPMScheduler, timesteps=[[3, 2]]), ValueError,
     "timesteps: expected a 1-D sequence"),
    ("ddpm-custom-timesteps-above", lambda: _set(SCHED.DDPMScheduler, timesteps=[40, 3]), ValueError,
     r"timesteps: expected integers in \[0, 39\], got 40.0"),
    ("ddpm-custom-timesteps-ascending", lambda: _set(SCHED.DDPMScheduler, timesteps=[3, 30]), ValueError,
     "timesteps: custom timesteps must be in descending order"),
    ("ddpm-custom-timesteps-str", lambda: _set(SCHED.DDPMScheduler, timesteps="abc"), TypeError,
     "timesteps: expected a sequence of numbers"),
    ("ddpm-variance-learned", lambda: SCHED.DDPMScheduler(variance_type="learned"), ValueError, "variance_type"),
    ("ddim-step-before-set", lambda: SCHED.DDIMScheduler().step(MO, 5, S), ValueError, "call set_timesteps before step"),
    ("ddim-steps-offset", lambda: _set(SCHED.DDIMScheduler, 3, init=dict(steps_offset=100)), ValueError,
     "steps_offset: 100 puts timesteps outside"),
    ("ddim-step-timestep-huge", lambda: _step_with(SCHED.DDIMScheduler, 2**70), ValueError, "timesteps: expected an int64"),
    ("ddim-step-eta-nan", lambda: (lambda s: (s.set_timesteps(3), s.step(MO, 5, S, eta=NAN)))(SCHED.DDIMScheduler()),
     ValueError, "eta: expected a finite value"),
    ("ddim-clip-range-nan", lambda: _stepped(SCHED.DDIMScheduler, clip_sample_range=NAN), ValueError, "clip_sample_range"),
    ("euler-sigmas-nan", lambda: _set(SCHED.EulerDiscreteScheduler, sigmas=[NAN, 1.0, 0.0]), ValueError,
     "sigmas: expected finite values >= 0, got nan at index 0"),
    ("euler-sigmas-short", lambda: _set(SCHED.EulerDiscreteScheduler, sigmas=[1.0]), ValueError,
     "sigmas: expected a 1-D sequence of at least 2"),
    ("euler-sigmas-negative", lambda: _set(SCHED.EulerDiscreteScheduler, sigmas=[1.0, -1.0]), ValueError, "sigmas"),
    ("euler-timesteps-above", lambda: _set(SCHED.EulerDiscreteScheduler, timesteps=[100.0, 10.0]), ValueError,
     r"timesteps: expected finite values in \[0, 39\], got 100.0"),
    ("euler-sigma_min-negative", lambda: SCHED.EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=-1.0),
     ValueError, "sigma_min: expected a finite value > 0"),
    ("euler-sigma_max-nan", lambda: SCHED.EulerDiscreteScheduler(sigma_max=NAN), ValueError, "sigma_max"),
    ("euler-step-integer-index", lambda: _step_with(SCHED.EulerDiscreteScheduler, 3), ValueError,
     "timestep: pass one of scheduler.timesteps"),
    ("euler-step-s_churn-nan", lambda: (lambda s: (s.set_timesteps(3), s.step(MO, s.timesteps[0], S, s_churn=NAN)))(
        SCHED.EulerDiscreteScheduler()), ValueError, "s_churn: expected a finite value"),
    ("euler-scale-input-past-end", lambda: (lambda s: (s.set_timesteps(2), s.set_begin_index(5),
                                                       s.scale_model_input(S, s.timesteps[0])))(
        SCHED.EulerDiscreteScheduler()), ValueError, "step: step index 5 is past"),
    ("flow-shift-zero", lambda: SCHED.FlowMatchEulerDiscreteScheduler(shift=0.0), ValueError,
     "shift: expected a finite value > 0"),
    ("flow-shift-nan", lambda: SCHED.FlowMatchEulerDiscreteScheduler(shift=NAN), ValueError, "shift"),
    ("flow-shift-negative", lambda: SCHED.FlowMatchEulerDiscreteScheduler(shift=-3.0), ValueError, "shift"),
    ("flow-set_shift-inf", lambda: SCHED.FlowMatchEulerDiscreteScheduler().set_shift(INF), ValueError, "shift"),
    ("flow-shift_terminal-one", lambda: SCHED.FlowMatchEulerDiscreteScheduler(shift_terminal=1.0), ValueError,
     r"shift_terminal: expected a value in \(0, 1\)"),
    ("flow-sigmas-nan", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, sigmas=[NAN, 0.5]), ValueError,
     r"sigmas: expected finite values in \[0, 1\], got nan"),
    ("flow-sigmas-above", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, sigmas=[1.5, 0.5]), ValueError,
     "sigmas: expected finite values in"),
    ("flow-sigmas-empty", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, sigmas=[]), ValueError,
     "sigmas: expected a 1-D sequence of at least 1"),
    ("flow-timesteps-negative", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, timesteps=[30.0, -1.0]), ValueError,
     "timesteps: expected finite values in"),
    ("flow-mu-nan", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, 3, mu=NAN,
                                 init=dict(use_dynamic_shifting=True)), ValueError, r"mu: expected a value in \[-700, 700\]"),
    ("flow-mu-missing", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, 3, init=dict(use_dynamic_shifting=True)),
     ValueError, "mu: required"),
    ("flow-scale_noise-t-not-in-schedule", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, 3).scale_noise(
        S, _T([7.7]), N), ValueError, "timestep: 7.69.* is not in the schedule"),
    ("flow-scale_noise-t-nan", lambda: _set(SCHED.FlowMatchEulerDiscreteScheduler, 3).scale_noise(S, NAN, N),
     ValueError, "timestep: expected a number, got nan"),
    ("dpm-flow_shift-nan", lambda: SCHED.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=NAN), ValueError,
     "flow_shift: expected a finite value > 0"),
    ("dpm-mu-huge", lambda: _set(SCHED.DPMSolverMultistepScheduler, 3, mu=1e6,
                                 init=dict(use_dynamic_shifting=True, use_flow_sigmas=True)), ValueError, "mu: expected"),
    ("dpm-timesteps-above", lambda: _set(SCHED.DPMSolverMultistepScheduler, timesteps=[100, 3]), ValueError,
     r"timesteps: expected integers in \[0, 39\]"),
    ("dpm-timesteps-empty", lambda: _set(SCHED.DPMSolverMultistepScheduler, timesteps=[]), ValueError, "timesteps"),
    ("dpm-solver-order-3", lambda: SCHED.DPMSolverMultistepScheduler(solver_order=3), ValueError, "solver_order"),
    ("dpm-step-before-set", lambda: SCHED.DPMSolverMultistepScheduler().step(MO, 5, S), ValueError,
     "call set_timesteps before step"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_SCHEDULERS], ids=_ids(BAD_SCHEDULERS))
def test_bad_scheduler_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ================================================================================================
# Valid but unusual inputs: the result of the plain call (or of the references)
# ================================================================================================


def _strided(x):
    """x as a non-contiguous view with the same values (every other element of a wider buffer)."""
    buf = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    buf[..., ::2] = x
    return buf[..., ::2]


def _transposed(x):
    """x as a transposed (non-contiguous) view with the same values."""
    return x.transpose(0, -1).contiguous().transpose(0, -1)


def _expanded(x):
    """x with its rows broadcast from the first one (stride 0 along dim 0)."""
    return x[:1].expand_as(x)


_L = _randn(4, 37, seed=7) * 3
_LEAD = _L + torch.cat([torch.full((4, 2), 20.0), torch.zeros(4, 35)], dim=1)
_ROWSEED = torch.tensor([11, 12, 13, 14])
_K = dict(top_k=9, top_p=0.9, min_p=0.02)


def _same(a, b):
    if isinstance(a, bool):
        return a == b
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


# (id, unusual call, plain call): equal results
VALID_SAMPLING = [
    ("sample-strided-logits", lambda: pk.sample(_strided(_L), seed=3, **_K), lambda: pk.sample(_L, seed=3, **_K)),
    ("sample-transposed-logits", lambda: pk.sample(_transposed(_L), seed=3, return_logprobs=True),
     lambda: pk.sample(_L, seed=3, return_logprobs=True)),
    ("sample-expanded-logits", lambda: pk.sample(_expanded(_L), seed=_ROWSEED),
     lambda: pk.sample(_L[:1].repeat(4, 1), seed=_ROWSEED)),
    ("sample-flipped-rows", lambda: pk.sample(_L.flip(0), seed=_ROWSEED.flip(0), **_K).flip(0),
     lambda: pk.sample(_L, seed=_ROWSEED, **_K)),
    ("sample-strided-row-knobs", lambda: pk.sample(_L, seed=3, temperature=_strided(_T([0.7, 1.0, 1.3, 0.0])),
                                                   top_k=_strided(_T([0, 5, 9, 1]))),
     lambda: pk.sample(_L, seed=3, temperature=_T([0.7, 1.0, 1.3, 0.0]), top_k=_T([0, 5, 9, 1]))),
    ("sample-expanded-row-knobs", lambda: pk.sample(_L, seed=3, top_p=_T([0.8]).expand(4), min_p=_T(0.05)),
     lambda: pk.sample(_L, seed=3, top_p=0.8, min_p=0.05)),
    ("sample-double-row-knobs", lambda: pk.sample(_L, seed=3, temperature=_T([0.5] * 4, dtype=torch.float64)),
     lambda: pk.sample(_L, seed=3, temperature=0.5)),
    ("sample-int32-top_k-rows", lambda: pk.sample(_L, seed=3, top_k=_T([3] * 4, dtype=torch.int32)),
     lambda: pk.sample(_L, seed=3, top_k=3)),
    ("sample-prev-strided-int32", lambda: pk.sample(_L, seed=3, repetition_penalty=1.5, presence_penalty=0.5,
                                                    prev_tokens=_strided(_T([[1, 2, -1], [3, 3, 3], [0, 36, 5],
                                                                             [-1, -1, -1]], dtype=torch.int32))),
     lambda: pk.sample(_L, seed=3, repetition_penalty=1.5, presence_penalty=0.5,
                       prev_tokens=_T([[1, 2, -1], [3, 3, 3], [0, 36, 5], [-1, -1, -1]]))),
    ("sample-prev-expanded", lambda: pk.sample(_L, seed=3, frequency_penalty=0.4, prev_tokens=_T([[4, 4, 7]]).expand(4, 3)),
     lambda: pk.sample(_L, seed=3, frequency_penalty=0.4, prev_tokens=_T([[4, 4, 7]] * 4))),
    ("sample-prev-empty-history", lambda: pk.sample(_L, seed=3, repetition_penalty=2.0,
                                                    prev_tokens=torch.zeros(4, 0, dtype=torch.long)),
     lambda: pk.sample(_L, seed=3)),
    ("sample-seed-strided", lambda: pk.sample(_L, seed=_strided(_ROWSEED)), lambda: pk.sample(_L, seed=_ROWSEED)),
    ("sample-seed-int32-tensor", lambda: pk.sample(_L, seed=_T(7, dtype=torch.int32)), lambda: pk.sample(_L, seed=7)),
    ("sample-seed-2**64-1", lambda: pk.sample(_L, seed=2**64 - 1), lambda: pk.sample(_L, seed=-1)),
    ("sample-seed-row-equals-one-row", lambda: pk.sample(_L, seed=_ROWSEED)[2:3], lambda: pk.sample(_L[2:3], seed=13)),
    ("sample-empty-batch", lambda: pk.sample(_L[:0], seed=1, return_logprobs=True),
     lambda: (torch.zeros(0, dtype=torch.long), torch.zeros(0))),
    ("sample-empty-batch-empty-vocab", lambda: pk.sample(torch.zeros(0, 0), seed=1), lambda: torch.zeros(0, dtype=torch.long)),
    ("sample-huge-top_k", lambda: pk.sample(_L, seed=3, top_k=2**70), lambda: pk.sample(_L, seed=3)),
    ("sample-huge-top_k-rows", lambda: pk.sample(_L, seed=3, top_k=_T([2**62] * 4)), lambda: pk.sample(_L, seed=3)),
    ("sample-temperature-inf", lambda: pk.sample(_L, seed=3, temperature=INF),
     lambda: pk.sample(torch.zeros_like(_L), seed=3)),
    # float knobs beyond float32 keep their meaning (1e300 was +inf, read as "off")
    # (tokens 0 and 1 lead by 20 nats, so an ignored penalty would draw them)
    ("sample-presence-1e300", lambda: pk.sample(_LEAD, seed=3, presence_penalty=1e300, prev_tokens=_T([[0, 1]] * 4)),
     lambda: pk.sample(_LEAD, seed=3, presence_penalty=3.4028234663852886e38, prev_tokens=_T([[0, 1]] * 4))),
    ("sample-presence-1e300-not-seen", lambda: bool(((pk.sample(_LEAD, seed=3, presence_penalty=1e300,
                                                                 prev_tokens=_T([[0, 1]] * 4))) > 1).all()),
     lambda: True),
    ("sample-repetition-1e300-rows", lambda: pk.sample(_LEAD, seed=3, prev_tokens=_T([[0, 1]] * 4),
                                                       repetition_penalty=_T([1e300] * 4, dtype=torch.float64)),
     lambda: pk.sample(_LEAD, seed=3, prev_tokens=_T([[0, 1]] * 4), repetition_penalty=3.4028234663852886e38)),
    ("filter-strided", lambda: pk.top_k_top_p_filter(_strided(_L), **_K), lambda: pk.top_k_top_p_filter(_L, **_K)),
    ("filter-expanded", lambda: pk.top_k_top_p_filter(_expanded(_L), top_p=0.7),
     lambda: pk.top_k_top_p_filter(_L[:1].repeat(4, 1), top_p=0.7)),
    ("filter-flipped-vocab", lambda: pk.top_k_top_p_filter(_L.flip(1), **_K).flip(1), lambda: pk.top_k_top_p_filter(_L, **_K)),
    ("filter-empty-batch", lambda: pk.top_k_top_p_filter(_L[:0], top_k=3), lambda: _L[:0]),
    ("filter-half-strided", lambda: pk.top_k_top_p_filter(_strided(_L.half()), top_k=4),
     lambda: pk.top_k_top_p_filter(_L.half(), top_k=4)),
    ("warper-strided", lambda: pk.TopKTopPLogitsWarper(top_k=5, top_p=0.9)(None, _strided(_L)),
     lambda: pk.top_k_top_p_filter(_L, top_k=5, top_p=0.9)),
    ("spec-strided", lambda: pk.speculative_accept(_strided(DRAFT), _strided(IDS), _strided(TARGET), seed=9),
     lambda: pk.speculative_accept(DRAFT, IDS, TARGET, seed=9)),
    ("spec-expanded", lambda: pk.speculative_accept(_expanded(DRAFT), _expanded(IDS), _expanded(TARGET), seed=_T([4, 5])),
     lambda: pk.speculative_accept(DRAFT[:1].repeat(2, 1, 1), IDS[:1].repeat(2, 1), TARGET[:1].repeat(2, 1, 1),
                                   seed=_T([4, 5]))),
    ("spec-flipped-rows", lambda: tuple(o.flip(0) for o in pk.speculative_accept(DRAFT.flip(0), IDS.flip(0),
                                                                                   TARGET.flip(0), seed=_T([8, 7]))),
     lambda: pk.speculative_accept(DRAFT, IDS, TARGET, seed=_T([7, 8]))),
    ("spec-int32-ids", lambda: pk.speculative_accept(DRAFT, IDS.int(), TARGET, seed=9),
     lambda: pk.speculative_accept(DRAFT, IDS, TARGET, seed=9)),
    ("spec-no-drafts", lambda: pk.speculative_accept(DRAFT[:, :0], IDS[:, :0], TARGET[:, :1], seed=9)[1],
     lambda: torch.zeros(2, dtype=torch.long)),
    ("unmask-strided-logits", lambda: pk.unmask_step(_strided(UX), UT, mask_token_id=10, num_reveal=1, seed=3, **_K),
     lambda: pk.unmask_step(UX, UT, mask_token_id=10, num_reveal=1, seed=3, **_K)),
    ("unmask-transposed-logits", lambda: pk.unmask_step(_transposed(UX), _transposed(UT), mask_token_id=10,
                                                         num_reveal=2, strategy="random", seed=3),
     lambda: pk.unmask_step(UX, UT, mask_token_id=10, num_reveal=2, strategy="random", seed=3)),
    ("unmask-expanded-logits", lambda: pk.unmask_step(_expanded(UX), UT, mask_token_id=10, num_reveal=_T([1, 2]),
                                                       seed=_T([4, 5])),
     lambda: pk.unmask_step(UX[:1].repeat(2, 1, 1), UT, mask_token_id=10, num_reveal=_T([1, 2]), seed=_T([4, 5]))),
    ("unmask-int32-tokens", lambda: pk.unmask_step(UX, UT.int(), mask_token_id=10, num_reveal=1, seed=3).long(),
     lambda: pk.unmask_step(UX, UT, mask_token_id=10, num_reveal=1, seed=3)),
    ("unmask-huge-num-reveal", lambda: pk.unmask_step(UX, UT, mask_token_id=10, num_reveal=2**70, seed=3),
     lambda: pk.unmask_step(UX, UT, mask_token_id=10, num_reveal=3, seed=3)),
    ("unmask-empty-length", lambda: pk.unmask_step(UX[:, :0], UT[:, :0], mask_token_id=10, num_reveal=1, seed=3),
     lambda: torch.zeros(2, 0, dtype=torch.long)),
    ("spec-empty-batch", lambda: pk.speculative_accept(DRAFT[:0], IDS[:0], TARGET[:0], seed=9),
     lambda: (torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long))),
]


def _valid_params(table):
    params = []
    for case_id, unusual, plain in table:
        params.append(pytest.param(unusual, plain, "cpu", id=f"cpu-{case_id}"))
        params.append(pytest.param(unusual, plain, "emulated", id=f"emulated-{case_id}", marks=pytest.mark.emulated))
    return params


def _run(backend, fn):
    if backend == "cpu":
        return fn()
    with emulated_cuda.routed():
        return fn()


@pytest.mark.parametrize("unusual,plain,backend", _valid_params(VALID_SAMPLING))
def test_valid_unusual_sampling(unusual, plain, backend):
    got = _run(backend, unusual)
    want = plain() if backend == "cpu" else _run(backend, plain)
    assert _same(got, want)
    if backend == "emulated":  # and the CUDA kernels agree with the CPU ones (tokens exactly)
        assert _close(got, unusual())


_B0 = torch.zeros(0, 3, 4)
_I0 = torch.zeros(2, 0)
_T0 = torch.zeros(0, dtype=torch.long)

VALID_DIFFUSION = [
    ("add_noise-strided", lambda: pk.add_noise(_strided(S), _strided(N), T2, ACP, target="v_prediction"),
     lambda: pk.add_noise(S, N, T2, ACP, target="v_prediction")),
    ("add_noise-transposed", lambda: pk.add_noise(_transposed(S), _transposed(N), T2, ACP),
     lambda: pk.add_noise(S, N, T2, ACP)),
    ("add_noise-expanded-x0", lambda: pk.add_noise(_expanded(S), N, T2, ACP),
     lambda: pk.add_noise(S[:1].repeat(2, 1, 1), N, T2, ACP)),
    ("add_noise-flipped-batch", lambda: tuple(o.flip(0) for o in pk.add_noise(S.flip(0), N.flip(0), T2.flip(0), ACP)),
     lambda: pk.add_noise(S, N, T2, ACP)),
    ("add_noise-t-strided-int32", lambda: pk.add_noise(S, N, _strided(T2.int()), ACP), lambda: pk.add_noise(S, N, T2, ACP)),
    ("add_noise-t-expanded", lambda: pk.add_noise(S, N, _T([7]).expand(2), ACP), lambda: pk.add_noise(S, N, 7, ACP)),
    ("add_noise-t-0d-tensor", lambda: pk.add_noise(S, N, _T(7), ACP), lambda: pk.add_noise(S, N, 7, ACP)),
    ("add_noise-acp-strided", lambda: pk.add_noise(S, N, T2, _strided(ACP)), lambda: pk.add_noise(S, N, T2, ACP)),
    ("add_noise-acp-float32", lambda: pk.add_noise(S, N, T2, ACP.float()), lambda: pk.add_noise(S, N, T2, ACP.float().double())),
    ("add_noise-flow-ends", lambda: pk.add_noise(S, N, _T([0.0, 1.0]), target="flow"), lambda: (
        torch.stack([S[0], N[1]]), N - S)),
    ("add_noise-empty-batch", lambda: pk.add_noise(_B0, _B0, _T0, ACP), lambda: (_B0, _B0)),
    ("add_noise-empty-inner", lambda: pk.add_noise(_I0, _I0, T2, ACP), lambda: (_I0, _I0)),
    ("loss-strided", lambda: pk.diffusion_loss(_strided(S), _strided(N), T2, ACP, weighting="min_snr", reduction="none"),
     lambda: pk.diffusion_loss(S, N, T2, ACP, weighting="min_snr", reduction="none")),
    ("loss-expanded", lambda: pk.diffusion_loss(_expanded(S), N, reduction="none"),
     lambda: pk.diffusion_loss(S[:1].repeat(2, 1, 1), N, reduction="none")),
    ("loss-empty-batch", lambda: pk.diffusion_loss(_B0, _B0, reduction="none"), lambda: torch.zeros(0)),
    ("ddpm-strided", lambda: pk.ddpm_step(_strided(MO), _strided(S), T2, T2 - 1, ACP, noise=_strided(N)),
     lambda: pk.ddpm_step(MO, S, T2, T2 - 1, ACP, noise=N)),
    ("ddpm-flipped-batch", lambda: tuple(o.flip(0) for o in pk.ddpm_step(MO.flip(0), S.flip(0), T2.flip(0),
                                                                           (T2 - 1).flip(0), ACP, noise=N.flip(0))),
     lambda: pk.ddpm_step(MO, S, T2, T2 - 1, ACP, noise=N)),
    ("ddpm-prev-int64-min", lambda: pk.ddpm_step(MO, S, 5, -(2**63), ACP, noise=N),
     lambda: pk.ddpm_step(MO, S, 5, -1, ACP, noise=N)),
    ("ddpm-empty-batch", lambda: pk.ddpm_step(_B0, _B0, _T0, _T0, ACP, seed=1), lambda: (_B0, _B0)),
    ("ddim-transposed", lambda: pk.ddim_step(_transposed(MO), _transposed(S), T2, _T([-1, 9]), ACP),
     lambda: pk.ddim_step(MO, S, T2, _T([-1, 9]), ACP)),
    ("ddim-expanded-t", lambda: pk.ddim_step(MO, S, _T([9]).expand(2), _T([4]).expand(2), ACP),
     lambda: pk.ddim_step(MO, S, 9, 4, ACP)),
    ("ddim-empty-inner", lambda: pk.ddim_step(_I0, _I0, 5, 4, ACP), lambda: (_I0, _I0)),
    ("euler-strided", lambda: pk.euler_step(_strided(MO), _strided(S), SIG, 0.5, prediction_type="v_prediction"),
     lambda: pk.euler_step(MO, S, SIG, 0.5, prediction_type="v_prediction")),
    ("euler-expanded-sigma", lambda: pk.euler_step(MO, S, _T([2.0]).expand(2), _T(0.0)), lambda: pk.euler_step(MO, S, 2.0, 0.0)),
    ("euler-flipped-batch", lambda: tuple(o.flip(0) for o in pk.euler_step(MO.flip(0), S.flip(0), SIG.flip(0), 0.5)),
     lambda: pk.euler_step(MO, S, SIG, 0.5)),
    ("euler-empty-batch", lambda: pk.euler_step(_B0, _B0, 1.0, 0.5), lambda: (_B0, _B0)),
    ("heun-strided", lambda: pk.heun_step(_strided(MO), _strided(S), 2.0, 1.0, prev_derivative=_strided(N),
                                          prev_sample=_strided(S)),
     lambda: pk.heun_step(MO, S, 2.0, 1.0, prev_derivative=N, prev_sample=S)),
    ("heun-first-stage-to-zero", lambda: pk.heun_step(MO, S, 2.0, 0.0)[0], lambda: S + (S - (S - 2.0 * MO)) / 2.0 * -2.0),
    ("dpm-transposed", lambda: pk.dpmpp_2m_step(_transposed(MO), _transposed(S), SIG, 0.5, prev_x0=_transposed(N),
                                                sigma_prev=3.0),
     lambda: pk.dpmpp_2m_step(MO, S, SIG, 0.5, prev_x0=N, sigma_prev=3.0)),
    ("dpm-expanded-sigma-prev", lambda: pk.dpmpp_2m_step(MO, S, 2.0, 0.5, prev_x0=N, sigma_prev=_T([3.0]).expand(2)),
     lambda: pk.dpmpp_2m_step(MO, S, 2.0, 0.5, prev_x0=N, sigma_prev=3.0)),
    ("dpm-to-zero", lambda: pk.dpmpp_2m_step(MO, S, 2.0, 0.0)[0], lambda: pk.dpmpp_2m_step(MO, S, 2.0, 0.0)[1]),
    ("flow-strided", lambda: pk.flow_match_step(_strided(MO), _strided(S), 0.8, 0.6),
     lambda: pk.flow_match_step(MO, S, 0.8, 0.6)),
    ("flow-expanded-sample", lambda: pk.flow_match_step(MO, _expanded(S), 0.8, 0.6),
     lambda: pk.flow_match_step(MO, S[:1].repeat(2, 1, 1), 0.8, 0.6)),
    ("flow-empty-batch", lambda: pk.flow_match_step(_B0, _B0, 0.8, 0.6, return_x0=False)[0], lambda: _B0),
    ("shift-sigmas-ends", lambda: pk.shift_sigmas(_T([0.0, 1.0]), 3.0), lambda: _T([0.0, 1.0])),
]


def _close(a, b):
    if isinstance(a, bool):
        return a == b
    if isinstance(a, (tuple, list)):
        return all(_close(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("unusual,plain,backend", _valid_params(VALID_DIFFUSION))
def test_valid_unusual_diffusion(unusual, plain, backend):
    got = _run(backend, unusual)
    want = plain() if backend == "cpu" else _run(backend, plain)
    assert _close(got, want)


def test_valid_unusual_against_references():
    # non-contiguous and expanded inputs against the float64 references of tests/reference.py
    x = _strided(_L)
    torch.testing.assert_close(pk.top_k_top_p_filter(x, **_K), ref.top_k_top_p_filter(_L.double(), **_K).float())
    got = pk.add_noise(_transposed(S), _expanded(N), T2, ACP, target="v_prediction")
    want = ref.diffusion_add_noise(S, N[:1].expand_as(N), T2, ACP, "v_prediction")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    got = pk.diffusion_loss(_strided(S), _expanded(N), T2, ACP, weighting="min_snr", reduction="none")
    want = ref.diffusion_loss(S, N[:1].expand_as(N), T2, ACP, weighting="min_snr", reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # an empty sample: the mean of nothing is NaN, as torch's
    assert bool(pk.diffusion_loss(_I0, _I0, reduction="none").isnan().all())


# ================================================================================================
# Knobs at the edges: what a tiny temperature, a huge logit or a huge penalty must give
# ================================================================================================


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emulated", marks=pytest.mark.emulated)])
def test_extreme_temperatures_and_logits(backend):
    def run():
        out = {}
        neg = _T([[-1.0, -2.0, -3.0], [-5.0, -4.0, -6.0]])
        # all-negative logits at a tiny temperature: the argmax, not "nothing drawable" (-1)
        out["tiny"] = pk.sample(neg, temperature=1e-40, seed=1, return_logprobs=True)
        out["tiny_rows"] = pk.sample(neg, temperature=_T([1e-300, 1e-45], dtype=torch.float64), seed=1)
        # logits near the float32 limit at T = 0.5: the largest wins (x / T overflowed to +inf)
        huge = _T([[3e38, 2e38, 1.0], [-3e38, 1.0, 3.4e38]])
        out["huge"] = [pk.sample(huge, temperature=0.5, seed=s) for s in range(6)]
        out["huge_filter"] = pk.top_k_top_p_filter(huge, top_p=0.5)
        # an exact tie at a tiny temperature: uniform over the tie
        tie = _T([[1.0, 3.0, 3.0, -2.0]])
        out["tie"] = torch.cat([pk.sample(tie, temperature=1e-30, seed=s) for s in range(40)])
        # a huge presence penalty pushes the seen ids out
        pres = pk.sample(torch.zeros(1, 4), presence_penalty=1e300, prev_tokens=_T([[0, 1, 2]]), seed=2,
                         return_logprobs=True)
        out["presence"] = pres
        return out

    out = _run(backend, run)
    tok, lp = out["tiny"]
    assert tok.tolist() == [0, 1] and lp.tolist() == [0.0, 0.0]
    assert out["tiny_rows"].tolist() == [0, 1]
    for t in out["huge"]:
        assert t.tolist() == [0, 2]
    assert torch.equal(out["huge_filter"], _T([[3e38, -INF, -INF], [-INF, -INF, 3.4e38]]))
    assert set(out["tie"].tolist()) == {1, 2}
    assert out["presence"][0].tolist() == [3] and out["presence"][1].tolist() == [0.0]


@pytest.mark.emulated
def test_device_rules_on_emulated_kernels():
    # What the CUDA kernels do with values they cannot check without a host sync (the rules of
    # sampling.py's docstring, DpmSolver in diffusion.h), run on the emulator with tiny inputs.
    x = _L[:2]
    emu = emulated_cuda.ops()
    # per-row knobs out of range act as their substitutes
    bad = _sample(emu, x, seed=SEED, rows=_R(temperature=_T([NAN, 1.0]), top_p=_T([0.5, 7.0]),
                                             repetition=_T([-1.0, 1.0]), min_p=_T([0.0, -3.0])),
                  prev=_T([[0, 1], [2, 40]]))
    good = _sample(OPS, x, seed=SEED, rows=_R(temperature=_T([0.0, 1.0]), top_p=_T([0.5, 1.0]),
                                              repetition=_T([1.0, 1.0]), min_p=_T([0.0, 0.0])),
                   prev=_T([[0, 1], [2, -1]]))
    assert torch.equal(bad[0], good[0])
    # out-of-vocabulary draft ids are rejected at their position (never an out-of-bounds read)
    ids = _T([[7, 1, 2], [4, -(2**63), 6]])
    out, acc = _spec(emu, ids=ids)
    assert acc.tolist() == [0, int(acc[1])] and int(acc[1]) <= 1
    assert torch.equal(out, _spec(OPS, ids=ids)[0])
    # flow sigmas outside [0, 1] in device memory give NaN for that sample (checked on the host
    # otherwise); the emulator's tensors live on the host, so it checks them like the CPU
    with pytest.raises(RuntimeError, match="sigma: expected values in"):
        _dpm(emu, sigma=_T([0.5, 1.5]), pt="flow_prediction", flow=True)

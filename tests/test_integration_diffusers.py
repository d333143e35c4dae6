"""The diffusers integration: AttnProcessor on diffusers' models (against the default processor
and a float64 reference), the schedulers' save_pretrained / from_pretrained in diffusers'
layout (both ways), and our schedulers inside saved and reloaded diffusers pipelines.

Every test that needs diffusers takes the `diffusers` fixture and skips alone without it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pretrain_kernels as pk
from pretrain_kernels.integrations import diffusers as pkd
from pretrain_kernels.integrations import schedulers as pks
from reference import diffusers_attention_ref, rel_err

SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
              "DPMSolverMultistepScheduler"]
# a non-default value for some constructor arguments of each class (what a saved config must carry)
NON_DEFAULT = {
    "DDPMScheduler": dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="v_prediction", clip_sample=False,
                          timestep_spacing="trailing", variance_type="fixed_large"),
    "DDIMScheduler": dict(num_train_timesteps=700, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False,
                          steps_offset=1, prediction_type="sample", clip_sample_range=2.0),
    "EulerDiscreteScheduler": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
    "FlowMatchEulerDiscreteScheduler": dict(shift=3.0, num_train_timesteps=800, shift_terminal=0.2,
                                            stochastic_sampling=False),
    "DPMSolverMultistepScheduler": dict(solver_order=2, algorithm_type="sde-dpmsolver++", solver_type="heun",
                                        use_karras_sigmas=True, lambda_min_clipped=-5.1, euler_at_final=True),
}


@pytest.fixture(scope="module")
def diffusers():
    """The diffusers module; a test that takes this fixture skips (alone) without it."""
    try:
        import diffusers
    except ImportError as e:  # missing, or not importable with this torch
        pytest.skip(f"diffusers is not importable: {e}")
    return diffusers


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def init_weights(module, seed):
    """Fresh random weights (also the norms' affine parameters, which start at 1 and 0)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def attention_modules(model, diffusers):
    from diffusers.models.attention_processor import Attention
    return [m for m in model.modules() if isinstance(m, Attention)]


# ---- tiny models -------------------------------------------------------------------------------


def unet2d(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def unet2d_condition(diffusers):
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                          attention_head_dim=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def dit(diffusers):
    torch.manual_seed(2)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10, norm_num_groups=2).eval()


def assert_close_fp32(got, want):
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


# ---- AttnProcessor on whole models ------------------------------------------------------------


def test_unet2d_model(diffusers):
    """UNet2DModel has no set_attn_processor: set_attn_processor(model) puts ours on its
    attention blocks (group norm, residual, rescale_output_factor, 4-D inputs)."""
    model = unet2d(diffusers)
    init_weights(model, 10)
    x, t = randn(2, 3, 8, 8, seed=11), torch.tensor([3, 700])
    with torch.no_grad():
        want = model(x, t).sample
        n = pkd.set_attn_processor(model)
        got = model(x, t).sample
    attns = attention_modules(model, diffusers)
    assert n == len(attns) >= 2
    assert all(isinstance(m.processor, pkd.AttnProcessor) for m in attns)
    assert any(m.group_norm is not None and m.residual_connection for m in attns)
    assert_close_fp32(got, want)


@pytest.mark.parametrize("masked", [False, True])
def test_unet2d_condition_model(diffusers, masked):
    """UNet2DConditionModel: self- and cross-attention, through model.set_attn_processor, with and
    without an encoder attention mask."""
    model = unet2d_condition(diffusers)
    init_weights(model, 12)
    x, t, enc = randn(3, 4, 8, 8, seed=13), torch.tensor([5, 400, 999]), randn(3, 7, 12, seed=14)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] + [0] * 6]) if masked else None
    with torch.no_grad():
        want = model(x, t, enc, encoder_attention_mask=mask).sample
        model.set_attn_processor(pkd.AttnProcessor())
        got = model(x, t, enc, encoder_attention_mask=mask).sample
        if masked:  # the mask matters to the output (so this test can see it ignored)
            assert (got - model(x, t, enc).sample).abs().max() > 1e-3
    procs = model.attn_processors
    assert len(procs) >= 4 and all(isinstance(p, pkd.AttnProcessor) for p in procs.values())
    assert any(m.is_cross_attention for m in attention_modules(model, diffusers))
    assert_close_fp32(got, want)


def test_dit_transformer_2d_model(diffusers):
    model = dit(diffusers)
    init_weights(model, 15)
    x, t, labels = randn(2, 4, 8, 8, seed=16), torch.tensor([1, 900]), torch.tensor([3, 7])
    with torch.no_grad():
        want = model(x, timestep=t, class_labels=labels).sample
        assert pkd.set_attn_processor(model) == len(attention_modules(model, diffusers)) == 2
        got = model(x, timestep=t, class_labels=labels).sample
    assert_close_fp32(got, want)


def test_torch_compile(diffusers):
    """The processor traces into one graph (fake kernels of the ops) and gives the eager result."""
    model = unet2d_condition(diffusers)
    init_weights(model, 17)
    model.set_attn_processor(pkd.AttnProcessor())
    x, t, enc = randn(2, 4, 8, 8, seed=18), torch.tensor([5, 400]), randn(2, 5, 12, seed=19)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x, t, enc).sample
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, enc).sample
    assert_close_fp32(got, want)


# ---- AttnProcessor on Attention modules of every kind -------------------------------------------

# (Attention constructor arguments, input shape, encoder_hidden_states shape or None, temb dim)
ATTENTION_CASES = {
    "self": (dict(query_dim=24, heads=3, dim_head=8), (2, 7, 24), None, None),
    "one_token": (dict(query_dim=16, heads=2, dim_head=8), (1, 1, 16), None, None),
    "long_odd": (dict(query_dim=20, heads=1, dim_head=20, bias=True), (2, 129, 20), None, None),
    "cross": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8), (2, 9, 16), (2, 5, 12), None),
    "cross_layer_norm": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8,
                              cross_attention_norm="layer_norm"), (2, 9, 16), (2, 5, 12), None),
    "cross_group_norm": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8,
                              cross_attention_norm="group_norm", cross_attention_norm_num_groups=3),
                         (2, 9, 16), (2, 5, 12), None),
    "4d_group_norm_residual": (dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True,
                                    rescale_output_factor=1.7, bias=True), (2, 16, 3, 5), None, None),
    "spatial_norm": (dict(query_dim=32, heads=2, dim_head=16, spatial_norm_dim=3, residual_connection=True),
                     (2, 32, 4, 3), None, 3),
    "qk_layer_norm": (dict(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm"), (2, 6, 16), None, None),
    "qk_rms_norm": (dict(query_dim=16, heads=4, dim_head=4, qk_norm="rms_norm"), (3, 5, 16), None, None),
    "out_dim": (dict(query_dim=16, heads=2, dim_head=8, out_dim=24), (2, 6, 16), None, None),
}


def make_attention(diffusers, kwargs, dtype=torch.float32, seed=20):
    from diffusers.models.attention_processor import Attention
    return init_weights(Attention(**kwargs), seed).eval().to(dtype)


def attention_inputs(shape, enc_shape, temb_dim, dtype, seed):
    h = randn(*shape, seed=seed, dtype=dtype)
    enc = randn(*enc_shape, seed=seed + 1, dtype=dtype) if enc_shape else None
    temb = None
    if temb_dim:  # SpatialNorm's zq: (B, zq_channels, h', w'), interpolated to the feature map
        temb = randn(shape[0], temb_dim, 2, 2, seed=seed + 2, dtype=dtype)
    return h, enc, temb


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_default_processor(diffusers, case):
    kwargs, shape, enc_shape, temb_dim = ATTENTION_CASES[case]
    attn = make_attention(diffusers, kwargs)
    h, enc, temb = attention_inputs(shape, enc_shape, temb_dim, torch.float32, seed=21)
    with torch.no_grad():
        want = attn(h, encoder_hidden_states=enc, temb=temb) if temb is not None else attn(h, encoder_hidden_states=enc)
        attn.set_processor(pkd.AttnProcessor())
        got = attn(h, encoder_hidden_states=enc, temb=temb) if temb is not None else attn(h, encoder_hidden_states=enc)
        ref = diffusers_attention_ref(attn, h, enc, temb=temb)
    assert got.shape == want.shape
    assert_close_fp32(got, want)
    assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("case", ["self", "cross_layer_norm", "4d_group_norm_residual", "qk_rms_norm"])
def test_attention_dtypes_against_float64(diffusers, case, dtype, tol):
    kwargs, shape, enc_shape, temb_dim = ATTENTION_CASES[case]
    attn = make_attention(diffusers, kwargs, dtype, seed=22)
    attn.set_processor(pkd.AttnProcessor())
    h, enc, temb = attention_inputs(shape, enc_shape, temb_dim, dtype, seed=23)
    with torch.no_grad():
        got = attn(h, encoder_hidden_states=enc)
        ref = diffusers_attention_ref(attn, h, enc)
    assert got.dtype == dtype
    assert rel_err(got, ref) < tol


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("per_query", [False, True])
def test_attention_mask(diffusers, kind, per_query):
    """attention_mask (batch, 1 or L, S) goes through attn.prepare_attention_mask, as the default
    processor does: bool (True = attend) or additive."""
    attn = make_attention(diffusers, dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8), seed=24)
    h, enc = randn(3, 6, 16, seed=25), randn(3, 11, 12, seed=26)
    keep = torch.rand(3, 6 if per_query else 1, 11, generator=gen(27)) < 0.6
    keep[..., 0] = True  # every query sees a key
    mask = keep if kind == "bool" else torch.where(keep, 0.0, -1e4) + 0.1 * randn(*keep.shape, seed=28)
    with torch.no_grad():
        want = attn(h, enc, attention_mask=mask)
        attn.set_processor(pkd.AttnProcessor())
        got = attn(h, enc, attention_mask=mask)
        ref = diffusers_attention_ref(attn, h, enc, attention_mask=mask)
        assert (got - attn(h, enc)).abs().max() > 1e-3  # the mask matters
    assert_close_fp32(got, want)
    assert rel_err(got, ref) < 1e-5


def test_attention_scale_qk_false(diffusers):
    """scale_qk=False: diffusers' default is then the slow AttnProcessor, with softmax scale 1;
    ours reads attn.scale and matches it."""
    from diffusers.models.attention_processor import AttnProcessor as Classic
    attn = make_attention(diffusers, dict(query_dim=16, heads=2, dim_head=8, scale_qk=False), seed=29)
    assert isinstance(attn.processor, Classic) and attn.scale == 1.0
    h = randn(2, 7, 16, seed=30)
    with torch.no_grad():
        want = attn(h)
        attn.set_processor(pkd.AttnProcessor())
        got = attn(h)
    assert_close_fp32(got, want)
    assert rel_err(got, diffusers_attention_ref(attn, h)) < 1e-5


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_attention_grouped_query(diffusers, kv_heads):
    """Attention(kv_heads=...) runs as grouped-query attention (AttnProcessor2_0 cannot run it)."""
    attn = make_attention(diffusers, dict(query_dim=32, heads=4, kv_heads=kv_heads, dim_head=8), seed=31)
    attn.set_processor(pkd.AttnProcessor())
    h = randn(2, 9, 32, seed=32)
    with torch.no_grad():
        got = attn(h)
        mask = (torch.rand(2, 1, 9, generator=gen(33)) < 0.7) | (torch.arange(9) == 0)
        got_masked = attn(h, attention_mask=mask)
    assert rel_err(got, diffusers_attention_ref(attn, h)) < 1e-5
    assert rel_err(got_masked, diffusers_attention_ref(attn, h, attention_mask=mask)) < 1e-5


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_attention_head_dim_above_kernel_limit(diffusers, kv_heads):
    """head_dim 288 > 256: torch's SDPA by default (as the default processor), a ValueError naming
    head_dim with fallback=False."""
    attn = make_attention(diffusers, dict(query_dim=16, heads=2, kv_heads=kv_heads, dim_head=288), seed=34)
    h = randn(2, 5, 16, seed=35)
    with torch.no_grad():
        attn.set_processor(pkd.AttnProcessor())
        got = attn(h)
        assert rel_err(got, diffusers_attention_ref(attn, h)) < 1e-5
        attn.set_processor(pkd.AttnProcessor(fallback=False))
        with pytest.raises(ValueError, match="head_dim"):
            attn(h)


def test_processor_bad_input(diffusers):
    with pytest.raises(TypeError, match="fallback"):
        pkd.AttnProcessor(fallback="yes")
    with pytest.raises(TypeError, match="model"):
        pkd.set_attn_processor("unet")
    with pytest.raises(TypeError, match="processor"):
        pkd.set_attn_processor(torch.nn.Linear(2, 2), processor=3)


def test_set_attn_processor_leaves_other_processors(diffusers):
    """Only the default processors are replaced: an added-KV attention keeps its own."""
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor
    model = torch.nn.ModuleDict({
        "plain": Attention(16, heads=2, dim_head=8),
        "added_kv": Attention(16, heads=2, dim_head=8, added_kv_proj_dim=6, processor=AttnAddedKVProcessor()),
    })
    assert pkd.set_attn_processor(model) == 1
    assert isinstance(model["plain"].processor, pkd.AttnProcessor)
    assert isinstance(model["added_kv"].processor, AttnAddedKVProcessor)
    assert pkd.set_attn_processor(torch.nn.Linear(2, 2)) == 0


def test_no_attention_backend_registration(diffusers):
    """diffusers' attention backends are the members of a closed enum: a third-party name is
    refused, so the module registers none (see its docstring). Should diffusers open the
    registry, this fails, and a register() is due."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    with pytest.raises(ValueError):
        AttentionBackendName("pretrain_kernels")
    assert not hasattr(pkd, "register")


# ---- schedulers: save_pretrained / from_pretrained ---------------------------------------------


def test_scheduler_module_paths():
    from pretrain_kernels import schedulers
    import pretrain_kernels.schedulers as legacy
    for name in SCHEDULERS:
        cls = getattr(pks, name)
        assert getattr(schedulers, name) is getattr(legacy, name) is getattr(pk, name) is cls
        assert issubclass(cls, pk.SchedulerMixin)
    assert pk.schedulers is schedulers and set(SCHEDULERS) <= set(pk.__all__)


def saved(directory):
    with open(os.path.join(directory, "scheduler_config.json"), encoding="utf-8") as f:
        return json.load(f)


def same_config(a, b):
    """Two configs agree on every constructor argument (tuples and lists alike)."""
    keys = {k for k in a if not k.startswith("_")} | {k for k in b if not k.startswith("_")}
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return all(norm(a.get(k)) == norm(b.get(k)) for k in keys)


def same_schedule(ours, theirs, steps=7, rtol=2e-4):
    """The same timesteps and sigmas after set_timesteps; rtol covers our float64 tables against
    diffusers' float32 ones (Karras sigmas move by ~1e-4 relative)."""
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps.double().numpy(), theirs.timesteps.double().numpy(), rtol=rtol)
    if hasattr(theirs, "sigmas"):
        np.testing.assert_allclose(ours.sigmas.double().numpy(), theirs.sigmas.double().numpy(), rtol=rtol)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_saves_like_diffusers(diffusers, name, tmp_path):
    """Our scheduler_config.json has the keys diffusers writes for the class (every constructor
    argument, _class_name, _diffusers_version) and the same values."""
    kw = NON_DEFAULT[name]
    getattr(pks, name)(**kw).save_pretrained(tmp_path / "ours")
    getattr(diffusers, name)(**kw).save_pretrained(tmp_path / "theirs")
    ours, theirs = saved(tmp_path / "ours"), saved(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    assert ours["_class_name"] == theirs["_class_name"] == name
    assert ours["_diffusers_version"] == pks.DIFFUSERS_VERSION
    assert same_config(ours, theirs)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_config_round_trips(diffusers, name, tmp_path):
    """diffusers' saved config loads into ours, ours into diffusers' class, and into ours again,
    with the same config and the same schedule."""
    theirs = getattr(diffusers, name)(**NON_DEFAULT[name])
    theirs.save_pretrained(tmp_path / "theirs")
    ours = getattr(pk, name).from_pretrained(tmp_path / "theirs")
    assert type(ours) is getattr(pks, name)
    assert same_config(ours.config, theirs.config)
    same_schedule(ours, theirs)

    ours.save_pretrained(tmp_path / "ours")
    back = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    assert same_config(back.config, theirs.config)
    same_schedule(ours, back)

    again = getattr(pk, name).from_pretrained(str(tmp_path / "ours"))
    assert same_config(again.config, ours.config)
    same_schedule(again, ours, rtol=0)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_from_pretrained_without_diffusers_files(name, tmp_path):
    """Round trip with our classes alone (no diffusers needed), through a subfolder, a file path
    and a keyword override."""
    cls = getattr(pk, name)
    ours = cls(**NON_DEFAULT[name])
    ours.save_pretrained(tmp_path / "pipe" / "scheduler")
    assert same_config(cls.from_pretrained(tmp_path / "pipe", subfolder="scheduler").config, ours.config)
    assert same_config(cls.from_pretrained(tmp_path / "pipe" / "scheduler" / "scheduler_config.json").config,
                       ours.config)
    loaded, unused = cls.from_pretrained(tmp_path / "pipe", subfolder="scheduler", num_train_timesteps=600,
                                         not_an_argument=1, return_unused_kwargs=True)
    assert loaded.config.num_train_timesteps == 600 and len(loaded) == 600 and unused == {"not_an_argument": 1}
    assert saved(tmp_path / "pipe" / "scheduler")["_class_name"] == name


def test_from_config_ignores_the_defaults_of_another_class(diffusers):
    """A DDPM config (timestep_spacing "leading" by default) made into Euler keeps Euler's default
    ("linspace"), as diffusers does with "_use_default_values"; a value set on purpose is kept."""
    for ddpm in (diffusers.DDPMScheduler(), diffusers.DDPMScheduler(timestep_spacing="trailing")):
        ours = pk.EulerDiscreteScheduler.from_config(ddpm.config)
        theirs = diffusers.EulerDiscreteScheduler.from_config(ddpm.config)
        assert ours.config.timestep_spacing == theirs.config.timestep_spacing
        assert same_config(ours.config, theirs.config)


def test_scheduler_save_load_bad_input(tmp_path):
    s = pk.DDIMScheduler()
    with pytest.raises(ValueError, match="push_to_hub"):
        s.save_pretrained(tmp_path, push_to_hub=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="save_directory"):
        s.save_pretrained(tmp_path / "a_file")
    with pytest.raises(OSError, match="scheduler_config.json"):
        pk.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        pk.DDIMScheduler.from_pretrained(tmp_path / "bad")
    with pytest.raises(TypeError, match="pretrained_model_name_or_path"):
        pk.DDIMScheduler.from_pretrained(3)
    # not a path: a Hub repository id, not in the local cache (nothing is downloaded)
    with pytest.raises(OSError, match="pretrained_model_name_or_path"):
        pk.DDIMScheduler.from_pretrained("no-such-owner/no-such-repo", subfolder="scheduler",
                                         cache_dir=str(tmp_path / "hub"), local_files_only=True)
    with pytest.raises(TypeError, match="config"):
        pk.DDIMScheduler.from_config([("num_train_timesteps", 10)])


# ---- schedulers in diffusers pipelines ----------------------------------------------------------


def tiny_unet(diffusers):
    torch.manual_seed(3)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()


def images(pipe, seed=5, steps=4):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=gen(seed), num_inference_steps=steps, output_type="np").images


@pytest.mark.parametrize("pipeline,scheduler", [("DDPMPipeline", "DDPMScheduler"), ("DDIMPipeline", "DDIMScheduler")])
def test_pipeline_saves_and_reloads_our_scheduler(diffusers, pipeline, scheduler, tmp_path):
    P = getattr(diffusers, pipeline)
    pipe = P(unet=tiny_unet(diffusers), scheduler=getattr(diffusers, scheduler)(num_train_timesteps=40))
    pipe.scheduler = getattr(pk, scheduler).from_config(pipe.scheduler.config)
    pkd.set_attn_processor(pipe.unet)
    want = images(pipe)
    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "model_index.json", encoding="utf-8") as f:
        index = json.load(f)
    assert index["scheduler"] == ["pretrain_kernels", scheduler]
    assert saved(tmp_path / "scheduler")["_class_name"] == scheduler

    back = P.from_pretrained(tmp_path)
    # DDPMPipeline keeps the scheduler it is given; DDIMPipeline's constructor converts any
    # scheduler into diffusers' DDIMScheduler (its own rule), from the loaded config.
    want_cls = getattr(pk, scheduler) if pipeline == "DDPMPipeline" else getattr(diffusers, scheduler)
    assert type(back.scheduler) is want_cls
    assert same_config(back.scheduler.config, pipe.scheduler.config)
    pkd.set_attn_processor(back.unet)
    got = images(back)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(images(back, seed=6) - want).max() > 1e-3  # another seed, other images


def test_pipeline_loads_in_a_fresh_process(diffusers, tmp_path):
    """A fresh process that imports diffusers first and pretrain_kernels second loads the saved
    pipeline with our scheduler, and saves it again as ["pretrain_kernels", ...]."""
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(diffusers), scheduler=pk.DDPMScheduler(num_train_timesteps=30))
    want = images(pipe, steps=3)
    pipe.save_pretrained(tmp_path / "a")
    np.save(tmp_path / "want.npy", want)
    script = f"""
import json, numpy as np, torch
from diffusers import DDPMPipeline
import pretrain_kernels as pk
pipe = DDPMPipeline.from_pretrained({str(tmp_path / "a")!r})
assert type(pipe.scheduler) is pk.DDPMScheduler, type(pipe.scheduler)
pipe.set_progress_bar_config(disable=True)
got = pipe(generator=torch.Generator().manual_seed(5), num_inference_steps=3, output_type="np").images
assert np.abs(got - np.load({str(tmp_path / "want.npy")!r})).max() < 1e-5
pipe.save_pretrained({str(tmp_path / "b")!r})
print(json.load(open({str(tmp_path / "b" / "model_index.json")!r}))["scheduler"])
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.dirname(pk.__path__[0]),
                                                                   os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['pretrain_kernels', 'DDPMScheduler']"


def test_loadable_classes_entry_is_idempotent(diffusers):
    from diffusers.pipelines import pipeline_loading_utils as plu
    pk.DDIMScheduler()  # registers (diffusers' pipelines are imported)
    before = {k: dict(v) for k, v in plu.LOADABLE_CLASSES.items()}
    assert pks._register_with_diffusers() and pks._register_with_diffusers()
    assert plu.LOADABLE_CLASSES == before
    assert plu.LOADABLE_CLASSES["pretrain_kernels"] == {"SchedulerMixin": ["save_pretrained", "from_pretrained"]}
    assert before["diffusers"]["SchedulerMixin"] == plu.ALL_IMPORTABLE_CLASSES["SchedulerMixin"]

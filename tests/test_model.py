import json

import pytest
import torch
import torch.nn.functional as F

from syndiff_stream.model import CheckpointError, Segmenter, preset_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Segmenter(preset_config("tiny")).eval()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_latent_estimate_is_exact_when_the_prediction_is_true(kind):
    """z0~ == z0 and n~ == n when the U-Net output is the true target, at every timestep."""
    m = Segmenter(preset_config("tiny", prediction_type=kind))
    z0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 50, 500, 999])
    sa, s1a = m._coeffs(t)
    z_t = sa * z0 + s1a * noise
    target = {"epsilon": noise, "v_prediction": sa * noise - s1a * z0, "sample": z0}[kind]
    noise_hat, z0_hat = m.estimates(target, z_t, t)
    assert torch.allclose(z0_hat, z0, atol=2e-3 if kind == "epsilon" else 1e-5)
    assert torch.allclose(noise_hat, noise, atol=1e-4)


def test_loss_terms_match_hand_computed_values():
    """L1(n, n~) + lambda L1(z0, z0~) + mu (soft Dice + BCE on D(z0~)), with the schedule written out."""
    torch.manual_seed(0)
    m = Segmenter(preset_config("tiny", latent_loss_weight=0.5, mask_loss_weight=0.25, image_size=64))
    image, mask = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    t, noise = torch.tensor([10, 999]), torch.randn(2, 4, 8, 8)
    losses = m.training_losses(image, mask, t=t, noise=noise)
    betas = torch.linspace(0.0015, 0.0155, 1000, dtype=torch.float64)
    a = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        z0 = m.encode_mask(mask)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        v = m(image, z_t, t)
        z0_hat = a.sqrt() * z_t - (1 - a).sqrt() * v
        n_hat = (1 - a).sqrt() * z_t + a.sqrt() * v
        l_noise, l_latent = (n_hat - noise).abs().mean(), (z0_hat - z0).abs().mean()
        logits = 4.0 * m.decode_raw(z0_hat)
        p = torch.sigmoid(logits)
        dice = (2 * (p * mask).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + mask.sum((1, 2, 3)) + 1)
        bce = -(mask * torch.log(p) + (1 - mask) * torch.log(1 - p)).mean()
        l_mask = (1 - dice).mean() + bce
    assert torch.allclose(losses["noise"], l_noise, atol=1e-5) and torch.allclose(losses["latent"], l_latent, atol=1e-5)
    assert torch.allclose(losses["mask"], l_mask, atol=1e-4)
    assert torch.allclose(losses["loss"], l_noise + 0.5 * l_latent + 0.25 * l_mask, atol=1e-4)
    assert losses["loss"].requires_grad


def test_tversky_focal_weighs_missed_pixels_by_beta():
    from syndiff_stream.model import tversky_focal_loss

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1
    logits = torch.full_like(mask, -20.0)  # predicts nothing: every polyp pixel missed
    miss = tversky_focal_loss(logits, mask, beta=0.9, gamma=2.0)
    # Tversky: tp = 0, fn = 16 -> 1 - 1 / (0.9 * 16 + 1); focal: the 16 missed pixels keep their full
    # BCE (softplus(20)), the 48 right ones ~0 (confidently right)
    focal = 16 / 64 * torch.nn.functional.softplus(torch.tensor(20.0))
    assert torch.allclose(miss, 1 - 1 / (0.9 * 16 + 1) + focal, atol=1e-4)
    assert tversky_focal_loss(logits, mask, beta=0.9, gamma=2.0) > tversky_focal_loss(logits, mask, beta=0.3, gamma=2.0)
    m = Segmenter(preset_config("tiny", image_size=64, mask_loss_type="tversky_focal"))
    losses = m.training_losses(torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float(),
                               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["mask"]) and losses["loss"].requires_grad


def test_overlap_terms_skip_empty_targets():
    """A polyp-free sample adds nothing to the Dice / Tversky term (its soft overlap is 1 only for an
    exactly empty prediction, which taught the model to predict nothing), only to the pixel terms;
    a batch of polyps only keeps the plain per-sample mean."""
    from syndiff_stream.model import over_polyps, soft_dice, tversky_focal_loss

    mask = torch.zeros(4, 1, 8, 8)
    mask[:2, :, 2:5, 2:5] = 1
    prob = torch.full_like(mask, 0.3)
    per_sample = 1 - soft_dice(prob, mask)
    assert per_sample[2:].min() > 0.9  # an empty target charges a faint guess almost like a miss
    assert torch.allclose(over_polyps(per_sample, mask), per_sample[:2].mean())
    assert over_polyps(per_sample, torch.zeros_like(mask)) == 0
    full = torch.ones_like(mask)
    assert torch.equal(over_polyps(per_sample, full), per_sample.mean())

    logits = torch.full_like(mask, 2.0)  # a blob everywhere: the empty samples pay through the pixel term
    with_empty = tversky_focal_loss(logits, mask, beta=0.7, gamma=2.0, overlap_on_empty=False)
    polyps_only = tversky_focal_loss(logits[:2], mask[:2], beta=0.7, gamma=2.0, overlap_on_empty=False)
    assert polyps_only < with_empty < tversky_focal_loss(logits, mask, beta=0.7, gamma=2.0)

    # the model's loss follows its config; the earlier loss stays the default (old checkpoints rebuild)
    torch.manual_seed(0)
    image, t, noise = torch.randn(4, 3, 64, 64), torch.tensor([999] * 4), torch.randn(4, 4, 8, 8)
    masks = torch.zeros(4, 1, 64, 64)
    masks[:2, :, 10:30, 10:30] = 1
    old = Segmenter(preset_config("tiny", image_size=64))
    new = Segmenter(preset_config("tiny", image_size=64, overlap_on_empty=False))
    new.load_state_dict(old.state_dict())
    l_old = old.training_losses(image, masks, t=t, noise=noise)["mask"]
    l_new = new.training_losses(image, masks, t=t, noise=noise)["mask"]
    assert l_new < l_old


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_latent_estimate_matches_diffusers_ddim_step(kind):
    """Our z0~ is what diffusers' own DDIMScheduler.step calls pred_original_sample."""
    from diffusers import DDIMScheduler

    m = Segmenter(preset_config("tiny", prediction_type=kind))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155, beta_schedule="linear",
                          prediction_type=kind, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(10)
    out, z_t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in (999, 499, 99):
        ref = sched.step(out, t, z_t).pred_original_sample
        _, z0 = m.estimates(out, z_t, torch.tensor([t]))
        assert torch.allclose(z0, ref, rtol=1e-4, atol=1e-4), t


def test_timesteps_stay_in_range_and_focus_on_the_inference_step():
    uniform = Segmenter(preset_config("tiny", timestep_sampling="uniform"))
    t = uniform.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert t.min() >= 1 and t.max() <= 999 and len(t.unique()) > 900
    focused = Segmenter(preset_config("tiny", timestep_sampling="focused", focus_prob=0.5, inference_timestep=999))
    t = focused.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert 0.45 < (t == 999).float().mean() < 0.55
    assert t.min() >= 1


def testsingle_step_is_deterministic_and_batch_independent(model):
    x = torch.rand(3, 3, 256, 256) * 2 - 1
    a = model.predict_proba(x)
    b = model.predict_proba(x[1:2])
    assert a.shape == (3, 1, 256, 256) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a[1:2], b, atol=1e-5)
    assert torch.equal(model.predict_proba(x), a)


def test_flip_tta_averages_the_frame_and_its_mirror():
    torch.manual_seed(0)
    m = Segmenter(preset_config("tiny", image_size=64)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    plain, mirrored = m.predict_proba(x), m.predict_proba(x.flip(-1)).flip(-1)
    m.config.tta_flip = True
    tta = m.predict_proba(x)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert torch.allclose(tta, tta.flip(-1).flip(-1)) and not torch.allclose(tta, plain, atol=1e-4)


def test_multistep_runs_from_the_same_noise(model):
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    p = model.predict_proba_multistep(x, steps=3)
    assert p.shape == (1, 1, 256, 256) and torch.isfinite(p).all()


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    loaded = Segmenter.from_pretrained(tmp_path / "ckpt")
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert torch.equal(model.predict_proba(x), loaded.predict_proba(x))
    assert loaded.config == model.config
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["format_version"] == 1


def test_corrupt_missing_and_mismatched_checkpoints_error_clearly(model, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Segmenter.from_pretrained(tmp_path / "nowhere")
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        Segmenter.from_pretrained(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        Segmenter.from_pretrained(ckpt)
    model.save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["config"]["cond_channels"] = 8
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config"):
        Segmenter.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Segmenter.from_pretrained(ckpt)
    config["format_version"] = 99
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        Segmenter.from_pretrained(ckpt)


def test_presets_and_parameter_budget():
    assert Segmenter(preset_config("compact")).num_parameters() <= 5_000_000
    large = Segmenter(preset_config("large"))
    assert 10_000_000 <= large.num_parameters() <= 25_000_000
    mask_ae = {k: v.shape for k, v in large.state_dict().items() if k.startswith("mask_vae.")}
    assert mask_ae == {k: v.shape for k, v in Segmenter(preset_config("compact")).state_dict().items()
                       if k.startswith("mask_vae.")}  # the same frozen mask autoencoder as compact
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="prediction_type"):
        preset_config("tiny", prediction_type="x0")


def _presence_model(**overrides) -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(preset_config("tiny", image_size=64, presence_head=True, **overrides))


def test_polyp_free_samples_teach_the_presence_head_and_not_the_mask():
    """With a head, the mask terms are those of the polyp samples alone, and a batch of polyp-free
    samples leaves the mask's U-Net and decoder path without a gradient (only z_c, through the head)."""
    model = _presence_model()
    image, t, noise = torch.randn(4, 3, 64, 64), torch.tensor([999] * 4), torch.randn(4, 4, 8, 8)
    masks = torch.zeros(4, 1, 64, 64)
    masks[:2, :, 10:30, 10:30] = 1
    mixed = model.training_losses(image, masks, t=t, noise=noise)
    polyps = model.training_losses(image[:2], masks[:2], t=t[:2], noise=noise[:2])
    for key in ("noise", "latent", "mask"):
        assert torch.allclose(mixed[key], polyps[key])
    assert mixed["presence"] > 0 and torch.allclose(
        mixed["loss"], mixed["noise"] + mixed["latent"] + mixed["mask"] + mixed["presence"])

    empty = model.training_losses(image[2:], masks[2:], t=t[2:], noise=noise[2:])
    empty["loss"].backward()
    assert empty["mask"] == 0 and torch.allclose(empty["loss"], empty["presence"])
    assert all(p.grad is None or not p.grad.any() for p in model.unet.parameters())
    assert model.presence.out.weight.grad.any() and model.vision_encoder.proj.weight.grad.any()


def test_the_presence_head_learns_only_at_the_inference_timestep():
    """At a small t the noisy latent still shows the true mask: those draws must not teach the head."""
    model = _presence_model()
    image, noise = torch.randn(2, 3, 64, 64), torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 10:30, 10:30] = 1
    both = model.training_losses(image, masks, t=torch.tensor([999, 999]), noise=noise)["presence"]
    first = model.training_losses(image, masks, t=torch.tensor([999, 10]), noise=noise)["presence"]
    alone = model.training_losses(image[:1], masks[:1], t=torch.tensor([999]), noise=noise[:1])["presence"]
    assert torch.allclose(first, alone) and not torch.allclose(first, both)
    with pytest.raises(ValueError, match="presence_head"):
        preset_config("tiny", presence_head=True, timestep_sampling="uniform")


def test_the_probability_map_is_presence_times_the_mask(tmp_path):
    model = _presence_model().eval()
    image = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z_c, z0 = model.single_step(image)
        expected = model.decode_latent(z0) * torch.sigmoid(model.presence(z_c, z0)).view(-1, 1, 1, 1)
    assert torch.allclose(model.predict_proba(image), expected)
    assert model.predict_presence(image).shape == (3,)
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(Segmenter.from_pretrained(tmp_path / "m").predict_proba(image), model.predict_proba(image))
    with pytest.raises(ValueError, match="no presence head"):
        Segmenter(preset_config("tiny", image_size=64)).predict_presence(image)


def test_a_latent_shift_centres_the_latents_and_decodes_back(model, tmp_path):
    """The shift moves latents and nothing else: encode subtracts it, decode adds it back, so the
    decoded mask of an encoded mask is the unshifted model's, and zero maps to the shift."""
    import copy

    mask = (torch.rand(2, 1, 256, 256) > 0.7).float()
    shifted = copy.deepcopy(model)
    shifted.config.latent_shift = (0.5, -1.0, 0.25, 2.0)
    shift = torch.tensor(shifted.config.latent_shift).view(1, -1, 1, 1) * model.config.latent_scaling_factor
    assert torch.allclose(shifted.encode_mask(mask), model.encode_mask(mask) - shift, atol=1e-6)
    assert torch.allclose(shifted.decode_raw(shifted.encode_mask(mask)), model.decode_raw(model.encode_mask(mask)),
                          atol=1e-5)
    zero = torch.zeros_like(model.encode_mask(mask[:1]))
    assert torch.allclose(shifted.decode_raw(zero), model.decode_raw(shift.expand_as(zero)), atol=1e-5)
    shifted.save_pretrained(tmp_path / "ckpt")
    assert Segmenter.from_pretrained(tmp_path / "ckpt").config.latent_shift == shifted.config.latent_shift
    assert model.config.latent_shift is None  # models saved before the field load uncentred


def test_the_cond_loss_teaches_the_encoder_and_leaves_everything_else_as_it_was():
    """loss.cond_weight: soft Dice + BCE of a coarse mask read from z_c by its head, at its weight; the head is
    built without a draw from the global generator, so every other weight and every later draw
    match the model without it, and inference never runs it."""
    torch.manual_seed(0)
    plain = Segmenter(preset_config("tiny", image_size=64))
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    model = Segmenter(preset_config("tiny", image_size=64, cond_loss_weight=0.5))
    assert torch.equal(torch.rand(3), after_plain) and plain.cond_head is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())

    image, t, noise = torch.randn(2, 3, 64, 64), torch.tensor([999, 999]), torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 10:30, 10:30] = 1
    losses = model.training_losses(image, masks, t=t, noise=noise)
    base = plain.training_losses(image, masks, t=t, noise=noise)
    logits = model.cond_head(model.vision_encoder(image))
    target = F.avg_pool2d(masks, 8)  # 64 px -> the 8 x 8 latent grid
    assert logits.shape == target.shape == (2, 1, 8, 8)
    prob = torch.sigmoid(logits)
    dice = (2 * (prob * target).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    expected = (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(losses["cond"], expected) and torch.allclose(losses["loss"], base["loss"] + 0.5 * expected)
    losses["cond"].backward()
    assert model.vision_encoder.proj.weight.grad.any()
    assert all(p.grad is None for p in model.unet.parameters())
    assert torch.equal(model.eval().predict_proba(image), plain.eval().predict_proba(image))


def test_batch_norm_replaces_every_group_norm_keeps_the_seeded_weights_and_saves_its_statistics(tmp_path):
    from syndiff_stream.model import batch_norms

    torch.manual_seed(0)
    group = Segmenter(preset_config("tiny"))
    torch.manual_seed(0)
    batch = Segmenter(preset_config("tiny", norm="batch"))
    n_group = sum(isinstance(m, torch.nn.GroupNorm) for m in group.modules())
    assert n_group > 0 and not any(isinstance(m, torch.nn.GroupNorm) for m in batch.modules())
    assert len(batch_norms(batch)) == n_group and not batch_norms(group)
    params = dict(batch.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in group.named_parameters())  # the same seeded start
    batch.train()
    x = torch.rand(4, 3, 256, 256) * 2 - 1
    batch.training_losses(x, (torch.rand(4, 1, 256, 256) > 0.8).float(), generator=torch.Generator().manual_seed(0))
    batch.eval()  # statistics moved by the training pass, then saved and loaded with the weights
    assert not torch.equal(batch_norms(batch.unet)[0].running_mean, torch.zeros_like(batch_norms(batch.unet)[0].running_mean))
    batch.save_pretrained(tmp_path / "bn")
    loaded = Segmenter.from_pretrained(tmp_path / "bn")
    assert loaded.config.norm == "batch" and torch.equal(loaded.predict_proba(x[:2]), batch.predict_proba(x[:2]))
    assert torch.allclose(loaded.predict_proba(x[:1]), loaded.predict_proba(x[:2])[:1], atol=1e-5)  # frames do not mix


def test_relu_replaces_every_silu_keeps_the_seeded_weights_and_round_trips(tmp_path):
    torch.manual_seed(0)
    silu = Segmenter(preset_config("tiny", presence_head=True))
    torch.manual_seed(0)
    relu = Segmenter(preset_config("tiny", presence_head=True, act="relu"))
    assert any(isinstance(m, torch.nn.SiLU) for m in silu.modules())
    assert not any(isinstance(m, torch.nn.SiLU) for m in relu.modules())
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu.modules()) >= 4  # blocks and the presence head
    params = dict(relu.named_parameters())
    assert all(torch.equal(p, params[n]) for n, p in silu.named_parameters())  # no parameter, no draw
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert not torch.allclose(relu.eval().predict_proba(x), silu.eval().predict_proba(x))
    relu.save_pretrained(tmp_path / "relu")
    loaded = Segmenter.from_pretrained(tmp_path / "relu")
    assert loaded.config.act == "relu" and torch.equal(loaded.predict_proba(x), relu.predict_proba(x))

"""The Difix network on the tiny architecture: one-step formula, multi-view attention, inference
API, saving/loading (difix3d folder, diffusers folder, release .pkl, hub errors), gradients."""

from __future__ import annotations

import copy
import inspect
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file, save_file

from difix3d.errors import Difix3DError
from difix3d.models.attention import MultiViewAttnProcessor
from difix3d.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_difix, load_pretrained, save_pretrained, save_release_checkpoint
from difix3d.models.difix import Difix, DifixConfig, skip_channels
from difix3d.models.pipeline import DifixPipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def difix(one_thread) -> Difix:
    return Difix.from_config("tiny").eval()


@pytest.fixture(scope="module")
def trained(difix: Difix) -> Difix:
    """The tiny model with every trainable weight moved away from its initialisation."""
    model = copy.deepcopy(difix)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_one_step_equals_ddpm_scheduler_at_t199(difix: Difix) -> None:
    config = difix.config
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = difix.denoise(latents, num_views=1)
        eps = difix.unet(latents, 199, encoder_hidden_states=difix.prompt_embeds.expand(2, -1, -1)).sample
    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
    )
    scheduler.set_timesteps(timesteps=[199])  # one inference step, at t=199
    reference = scheduler.step(eps, 199, latents, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)  # the scheduler adds noise of std 1e-10


def test_single_view_processor_equals_default(difix: Difix) -> None:
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    default = copy.deepcopy(difix)
    default.unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        assert torch.equal(difix.denoise(latents, 1), default.denoise(latents, 1))
        # With two views, the views now see each other.
        assert not torch.allclose(difix.denoise(latents, 2), default.denoise(latents, 1))


def test_views_per_call_and_user_processors_kept(difix: Difix) -> None:
    class Counting(AttnProcessor2_0):
        calls = 0

        def __call__(self, *args, **kwargs):
            Counting.calls += 1
            return super().__call__(*args, **kwargs)

    model = copy.deepcopy(difix)
    model.unet.set_attn_processor(Counting())  # a user's processor, set after Difix was built
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = model.denoise(latents, 1)
        two = model.denoise(latents.repeat(2, 1, 1, 1), 2)  # two identical views attend like one
    assert Counting.calls > 0
    processors = model.unet.attn_processors.values()
    assert all(isinstance(p, MultiViewAttnProcessor) and isinstance(p.inner, Counting) for p in processors)
    # Every layer accepts the view count, so diffusers drops and warns about nothing.
    assert all("num_views" in inspect.signature(p.__call__).parameters for p in processors)
    torch.testing.assert_close(two, one.repeat(2, 1, 1, 1), atol=1e-5, rtol=1e-5)


def test_reference_changes_target_and_order_does_not_matter(trained: Difix) -> None:
    image, ref_a, ref_b = _images(3, 3, 32, 32).unbind(0)
    alone = trained.fix(image[None])
    with_a = trained.fix(image[None], ref_a[None])
    assert (alone - with_a).abs().max() > 1e-3
    both = trained.fix(image[None], torch.stack([ref_a, ref_b])[None])
    swapped = trained.fix(image[None], torch.stack([ref_b, ref_a])[None])
    torch.testing.assert_close(both, swapped, atol=1e-5, rtol=0)
    twice = trained.fix(image[None], torch.stack([ref_a, ref_a])[None])
    assert (twice - with_a).abs().max() > 0  # a second copy of the same reference changes attention weights


def test_skip_connections_follow_vae_channels(difix: Difix) -> None:
    assert skip_channels(difix.vae) == [(32, 32), (32, 32), (16, 32), (16, 32)]
    assert len(difix.skip_convs()) == 4
    for conv in difix.skip_convs():
        assert torch.all(conv.get_base_layer().weight == 1e-5)
    lora_layer = difix.vae.decoder.conv_in
    assert lora_layer.scaling["vae_skip"] == 2.0  # lora_alpha 8 / rank 4, as peft computes it


def test_odd_sizes_types_and_batches(trained: Difix) -> None:
    batch = _images(3, 3, 77, 45)
    fixed = trained.fix(batch, batch_size=2)
    assert fixed.shape == (3, 3, 77, 45) and fixed.dtype == torch.float32
    torch.testing.assert_close(fixed, trained.fix(batch, batch_size=3), atol=1e-5, rtol=0)
    single = trained.fix(batch[0])
    assert single.shape == (3, 77, 45)
    array = (batch[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    fixed_array = trained.fix(array)
    assert fixed_array.shape == (77, 45, 3) and fixed_array.dtype == np.uint8
    fixed_pil = trained.fix(Image.fromarray(array), refs=Image.fromarray(array[:40]))
    assert isinstance(fixed_pil, Image.Image) and fixed_pil.size == (45, 77)
    as_bf16 = copy.deepcopy(trained).to(torch.bfloat16).fix(batch[:1])
    assert as_bf16.dtype == torch.float32 and (as_bf16 - fixed[:1]).abs().mean() < 0.05


def test_gradients_reach_unet_lora_and_skips_not_encoder(trained: Difix) -> None:
    model = copy.deepcopy(trained).train()
    model.enable_gradient_checkpointing()
    views = _images(1, 2, 3, 32, 32) * 2 - 1
    model(views).square().mean().backward()

    def has_gradient(parameters) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)

    vae = dict(model.vae.named_parameters())
    assert has_gradient(model.unet.parameters())
    assert has_gradient(p for n, p in vae.items() if "lora_B" in n)
    assert has_gradient(p for n, p in vae.items() if "skip_conv" in n and "base_layer" in n)
    assert all(p.grad is None for n, p in vae.items() if n.startswith("encoder."))
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}


def test_residual_output_keeps_what_the_unet_leaves_and_trains_both_parts(trained: Difix) -> None:
    from difix3d.training.autoencoder import identity_start

    views = _images(1, 2, 3, 16, 24) * 1.6 - 0.8
    model = copy.deepcopy(trained)
    model.config.residual_output = True
    assert not torch.allclose(model(views), views[:, 0], atol=1e-3)  # a trained UNet changes the image
    identity_start(model)  # the UNet now leaves every latent as it is
    torch.testing.assert_close(model(views), views[:, 0], atol=1e-5, rtol=0)  # the autoencoder's error too

    model = copy.deepcopy(trained).train()
    model.config.residual_output = True
    model(views).square().mean().backward()
    vae = dict(model.vae.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in vae.items() if "lora_B" in n)


def test_save_and_load_are_bit_exact(trained: Difix, tmp_path) -> None:
    save_pretrained(trained, tmp_path / "model")
    loaded = load_pretrained(tmp_path / "model")
    original = trained.state_dict()
    assert original.keys() == loaded.state_dict().keys()
    assert all(torch.equal(original[key], value) for key, value in loaded.state_dict().items())
    image = _images(1, 3, 32, 32)
    assert torch.equal(trained.fix(image), loaded.fix(image))


def test_embedded_names_the_packaged_model() -> None:
    from difix3d.models.ids import EMBEDDED_DIFIX

    by_name, by_folder = load_difix("embedded"), load_difix(EMBEDDED_DIFIX)
    assert by_name.config.to_dict() == by_folder.config.to_dict()
    folder_state = by_folder.state_dict()
    assert all(torch.equal(value, folder_state[key]) for key, value in by_name.state_dict().items())


def test_release_checkpoint_loads_back_identically(difix: Difix, trained: Difix, tmp_path) -> None:
    save_pretrained(difix, tmp_path / "base")  # shares the frozen VAE weights with `trained`
    save_release_checkpoint(trained, tmp_path / "model_10.pkl")
    release = torch.load(tmp_path / "model_10.pkl", weights_only=True)
    assert "decoder.conv_in.lora_A.vae_skip.weight" in release["state_dict_vae"]
    assert "decoder.skip_conv_1.base_layer.weight" in release["state_dict_vae"]
    loaded = load_difix(tmp_path / "model_10.pkl", base=tmp_path / "base")
    image, ref = _images(2, 3, 32, 32)
    assert torch.equal(trained.fix(image[None], ref[None]), loaded.fix(image[None], ref[None]))
    # The release's own .pkl has no `mv_unet`: assumed trained with references; ours records it.
    assert release["mv_unet"] is True and loaded.config.reference_views
    reference_free = copy.deepcopy(trained)
    reference_free.config.reference_views = False
    save_release_checkpoint(reference_free, tmp_path / "model_20.pkl")
    assert not load_difix(tmp_path / "model_20.pkl", base=tmp_path / "base").config.reference_views
    residual = copy.deepcopy(trained)
    residual.config.residual_output = True
    save_release_checkpoint(residual, tmp_path / "model_40.pkl")
    assert load_difix(tmp_path / "model_40.pkl", base=tmp_path / "base").config.residual_output
    assert not loaded.config.residual_output
    del release["mv_unet"]
    torch.save(release, tmp_path / "model_30.pkl")
    assert load_difix(tmp_path / "model_30.pkl", base=tmp_path / "base").config.reference_views


def _write_diffusers_folder(difix: Difix, folder, vae_state: dict, hub: str | None = None, vae_settings: dict | None = None) -> None:
    """A pipeline folder laid out like SD-Turbo (`hub=None`) or like the hub repo `nvidia/difix` /
    `nvidia/difix_ref`: model_index.json, scheduler/, unet/, vae/ (with the release's custom VAE code
    file and its Difix keys in config.json), a tiny CLIP text_encoder/ and tokenizer/. `difix_ref`
    ships its multi-view UNet as custom code (unet/unet_2d_condition.py); the code files are stubs,
    as the loader never runs them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_module = "unet_2d_condition" if hub == "nvidia/difix_ref" else "diffusers"
    vae_module = "diffusers" if hub is None else "autoencoder_kl"
    index = {
        "_class_name": "StableDiffusionPipeline" if hub is None else "DifixPipeline",
        "_diffusers_version": "0.25.1",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": True,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": [unet_module, "UNet2DConditionModel"],
        "vae": [vae_module, "AutoencoderKL"],
    }
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    difix.unet.save_pretrained(folder / "unet")
    (folder / "vae").mkdir()
    vae_config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.25.1", **dict(difix.vae.config)}
    if hub is not None:
        vae_config.update({"gamma": 1.0, "ignore_skip": False, "lora_rank": 4, **(vae_settings or {})})
        (folder / "vae" / "autoencoder_kl.py").write_text("# the release's VAE with skip connections (stub)\n")
    if unet_module != "diffusers":
        (folder / "unet" / f"{unet_module}.py").write_text("# the release's multi-view UNet (stub)\n")
    (folder / "vae" / "config.json").write_text(json.dumps(vae_config))
    save_file({k: v.contiguous() for k, v in vae_state.items()}, folder / "vae" / "diffusion_pytorch_model.safetensors")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")


def _hub_layout_vae_state(model: Difix) -> dict:
    """The VAE weights as the hub files hold them: peft-wrapped decoder under the release's adapter name."""
    return {k.replace(".vae_skip.", ".default."): v for k, v in model.vae.state_dict().items()}


def test_diffusers_folders_plain_base_and_peft_wrapped_vae(difix: Difix, trained: Difix, tmp_path) -> None:
    vae_state = trained.vae.state_dict()
    # Plain SD-Turbo layout: no adapters, LoRA-wrapped layers under their plain names.
    plain = {k.replace(".base_layer", ""): v for k, v in vae_state.items() if "lora_" not in k and "skip_conv" not in k}
    _write_diffusers_folder(trained, tmp_path / "sd-turbo", plain)
    base = load_difix(tmp_path / "sd-turbo")
    assert base.prompt_embeds.shape == (1, 77, 32)
    assert torch.equal(base.vae.decoder.conv_in.base_layer.weight, trained.vae.decoder.conv_in.base_layer.weight)
    assert torch.all(base.vae.decoder.conv_in.lora_B["vae_skip"].weight == 0)
    assert torch.all(base.skip_convs()[0].base_layer.weight == 1e-5)
    assert not base.config.reference_views  # diffusers' own UNet: SD-Turbo never saw references
    # Hub Difix layout: peft-wrapped decoder under another adapter name.
    _write_diffusers_folder(trained, tmp_path / "difix", _hub_layout_vae_state(trained), hub="nvidia/difix_ref")
    released = load_difix(tmp_path / "difix")
    released.prompt_embeds.copy_(trained.prompt_embeds)  # the tiny text encoder gives its own prompt
    image = _images(1, 3, 32, 32)
    assert torch.equal(released.fix(image), trained.fix(image))


@pytest.fixture(scope="module")
def hub_folders(trained: Difix, tmp_path_factory) -> dict:
    """Tiny folders laid out like nvidia/difix and nvidia/difix_ref, both holding `trained`'s weights."""
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for hub in ("nvidia/difix", "nvidia/difix_ref"):
        folders[hub] = root / hub.split("/")[1]
        _write_diffusers_folder(trained, folders[hub], _hub_layout_vae_state(trained), hub=hub)
    return folders


def _load_hub(folder, trained: Difix) -> Difix:
    model = load_difix(folder)
    model.prompt_embeds.copy_(trained.prompt_embeds)  # the tiny text encoder gives its own prompt
    return model


def _independent_views(model: Difix, image: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The release's plain-UNet pipeline given a reference: both views through the UNet as a batch,
    each attending to itself only; the target decoded."""
    plain = copy.deepcopy(model)
    plain.unet.set_attn_processor(AttnProcessor2_0())
    views = torch.stack([image, ref], dim=1) * 2 - 1
    with torch.no_grad():
        latents, skips = plain.encode(views.flatten(0, 1))
        clean = plain.unet(latents, 199, encoder_hidden_states=plain.prompt_embeds.expand(2, -1, -1)).sample
        clean = (latents - plain._x0_eps_scale * clean) * plain._x0_scale
        target = plain.decode(clean[:1], [skip[:1] for skip in skips]).clamp(-1, 1)
    return (target + 1) / 2


@pytest.mark.parametrize("hub", ["nvidia/difix", "nvidia/difix_ref"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_hub_layouts_decide_reference_attention(hub, with_reference, hub_folders, trained: Difix, caplog) -> None:
    model = _load_hub(hub_folders[hub], trained)
    uses_references = hub == "nvidia/difix_ref"
    assert model.config.reference_views is uses_references
    image, ref = _images(2, 1, 3, 32, 32, seed=3)
    refs = ref if with_reference else None
    with caplog.at_level(logging.INFO, logger="difix3d.models.difix"):
        fixed = model.fix(image, refs)
        assert torch.equal(model.fix(image, refs), fixed)  # a second call logs nothing more
    logged = [record for record in caplog.records if record.name == "difix3d.models.difix"]
    if uses_references and with_reference:  # the joint multi-view attention of Difix-ref
        assert torch.equal(fixed, trained.fix(image, ref)) and not logged
        assert (fixed - trained.fix(image)).abs().max() > 1e-3
    elif uses_references:  # allowed, and said once
        assert torch.equal(fixed, trained.fix(image))
        assert len(logged) == 1 and "trained with reference views" in logged[0].getMessage()
    elif with_reference:  # nvidia/difix: the reference is ignored, as the release's plain UNet does
        assert torch.equal(fixed, model.fix(image))
        torch.testing.assert_close(fixed, _independent_views(model, image, ref), atol=1e-5, rtol=0)
        assert len(logged) == 1 and logged[0].levelno == logging.WARNING and "ignored" in logged[0].getMessage()
    else:
        assert torch.equal(fixed, trained.fix(image)) and not logged


def test_hub_vae_config_gamma_ignore_skip_and_rank_are_honoured(trained: Difix, tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(logging.getLogger("diffusers"), "propagate", True)  # diffusers keeps its logs to itself
    caplog.set_level(logging.WARNING, logger="diffusers")
    image = _images(1, 3, 32, 32, seed=4)
    half_gamma = copy.deepcopy(trained)
    half_gamma.gamma = 0.5
    _write_diffusers_folder(trained, tmp_path / "gamma", _hub_layout_vae_state(trained), hub="nvidia/difix", vae_settings={"gamma": 0.5})
    loaded = _load_hub(tmp_path / "gamma", trained)
    assert loaded.config.gamma == 0.5 and loaded.config.lora_rank == 4
    assert torch.equal(loaded.fix(image), half_gamma.fix(image))
    assert (loaded.fix(image) - trained.fix(image)).abs().max() > 1e-4
    _write_diffusers_folder(trained, tmp_path / "noskip", _hub_layout_vae_state(trained), hub="nvidia/difix", vae_settings={"ignore_skip": True})
    no_skip = copy.deepcopy(trained)
    no_skip.gamma = 0.0
    assert torch.equal(_load_hub(tmp_path / "noskip", trained).fix(image), no_skip.fix(image))
    assert not [r for r in caplog.records if "will be ignored" in r.getMessage()]  # diffusers' unknown-key warning
    # A rank the weights do not have is a one-line error, not a silent reinterpretation.
    _write_diffusers_folder(trained, tmp_path / "rank", _hub_layout_vae_state(trained), hub="nvidia/difix", vae_settings={"lora_rank": 2})
    with pytest.raises(Difix3DError, match="shape checkpoint != model"):
        load_difix(tmp_path / "rank")


def test_offline_hub_id_gives_one_clear_error(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(Difix3DError) as error:
        load_difix("nvidia/difix_ref")
    message = str(error.value)
    assert "nvidia/difix_ref" in message and "HF_HUB_OFFLINE" in message and "give that folder as the model" in message
    assert "\n" not in message
    with pytest.raises(Difix3DError, match="no Difix model"):
        load_difix(str(tmp_path / "missing" / "model"))


def test_mismatched_checkpoint_lists_the_problems(trained: Difix, tmp_path) -> None:
    save_pretrained(trained, tmp_path / "model")
    state = load_file(tmp_path / "model" / WEIGHTS_FILE)
    del state["unet.conv_in.bias"]
    state["unet.conv_out.weight"] = torch.zeros(4, 16, 3, 3)
    state["unet.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model" / WEIGHTS_FILE)
    with pytest.raises(Difix3DError) as error:
        load_difix(tmp_path / "model")
    message = str(error.value)
    assert "missing (1): unet.conv_in.bias" in message
    assert "unexpected (1): unet.extra.weight" in message
    assert "unet.conv_out.weight [4, 16, 3, 3] != [4, 32, 3, 3]" in message
    config = json.loads((tmp_path / "model" / CONFIG_FILE).read_text())
    config["lora_target_modules"] = ["decoder.no_such_layer"]
    (tmp_path / "model" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(Difix3DError, match="cannot build a Difix"):
        load_difix(tmp_path / "model")


def test_random_weights_only_by_name() -> None:
    with pytest.raises(Difix3DError, match="unknown Difix architecture"):
        DifixConfig.named("sd-turbo-xl")
    assert DifixConfig.named("sd-turbo").vae["block_out_channels"] == [128, 256, 512, 512]


def test_pipeline_call_shape(trained: Difix) -> None:
    pipe = DifixPipeline(trained)
    image = Image.fromarray((_images(24, 40, 3).numpy() * 255).astype(np.uint8))
    result = pipe("remove degradation", image=image, ref_image=image, num_inference_steps=1, timesteps=[199], guidance_scale=0.0)
    assert len(result.images) == 1 and result.images[0].size == (40, 24)
    with pytest.raises(Difix3DError, match="single-step"):
        pipe(image=image, num_inference_steps=4)

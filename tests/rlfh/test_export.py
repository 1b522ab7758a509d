"""``rlfh export``: a checkpoint's LoRA in kohya's layout loads back through diffusers' own kohya loader
to the same weights (alpha included) and changes the pipeline's output as the checkpoint's own file
does; the peft folder loads with peft; a full fine-tune is one UNet file; bad paths are named."""

from __future__ import annotations

import copy
import json

import pytest
import torch

RANK, ALPHA = 4, 2.0  # alpha != rank: an export that dropped alpha would load at twice the strength
TARGETS = ["to_k", "to_out.0", "to_q", "to_v"]


@pytest.fixture(scope="module")
def exported_run(tiny_model_dir, tmp_path_factory):
    """A run directory laid out as training leaves it (config.yaml, checkpoints/latest, an eval), its one
    checkpoint written by the family's ``save_lora`` with a seeded, far-from-zero LoRA, and an HcP file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from families import add_lora, family_of, load_pipeline
    from rlfh.config.schema import load_config, save_config
    from rlfh.run.checkpoints import checkpoint_dir, mark_latest, write_file_manifest
    from tests.conftest import REPO

    run = tmp_path_factory.mktemp("export") / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.path={tiny_model_dir}", f"run_dir={run}"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    pipe = load_pipeline(cfg.model)
    base_unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(0)
    add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    ckpt = checkpoint_dir(run, 2)
    ckpt.mkdir(parents=True)
    family_of(pipe).save_lora(ckpt, state, {"r": RANK, "lora_alpha": ALPHA, "target_modules": TARGETS})
    save_file({"phi": torch.zeros(3)}, ckpt / "hcp.safetensors")
    (ckpt / "trainer_state.json").write_text(json.dumps({"round": 2, "policy_version": 2}))
    write_file_manifest(ckpt)
    mark_latest(run, ckpt)
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps(EVAL_SUMMARY))
    pipe.unet = base_unet
    return run, ckpt, pipe, state, copy.deepcopy(base_unet)


EVAL_SUMMARY = {
    "models": {"model": {}},
    "num_images_per_model": 4,
    "num_prompts": 2,
    "seeds": [0, 1],
    "ci_method": "bootstrap",
    "rewards": {"facescore": {"model": {"mean": 0.625, "ci_low": 0.5, "ci_high": 0.75, "not_computable_rate": 0.0}}},
    "regions": {"model": {}},
}


def deltas(unet, adapter: str) -> dict[str, torch.Tensor]:
    """Each adapted module's weight change, scaling * B @ A, by module name."""
    return {
        name: m.scaling[adapter] * m.lora_B[adapter].weight @ m.lora_A[adapter].weight
        for name, m in unet.named_modules()
        if hasattr(m, "lora_A") and adapter in m.lora_A
    }


def expected_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        k[: -len(".lora_A.weight")]: (ALPHA / RANK) * state[k.replace("lora_A", "lora_B")] @ v
        for k, v in state.items()
        if k.endswith(".lora_A.weight")
    }


def latents(pipe) -> torch.Tensor:
    out = pipe(
        "a photo of a person",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=1.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images


def assert_same_deltas(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and len(want) > 0
    for name, d in want.items():
        torch.testing.assert_close(got[name], d, rtol=1e-5, atol=1e-6, msg=name)


def test_kohya_round_trips_through_diffusers_kohya_loader(exported_run, tmp_path):
    from safetensors import safe_open

    from rlfh.run.export import export

    run, ckpt, pipe, state, _ = exported_run
    done = export(run, "kohya", tmp_path / "kohya.safetensors")
    assert done.checkpoint == ckpt
    with safe_open(str(done.path), framework="pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        assert f.metadata()["ss_network_alpha"] == str(ALPHA)
    assert all(k.startswith("lora_unet_") for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert alphas == {ALPHA} and len(keys) == 3 * len(state) // 2

    pipe.load_lora_weights(str(done.path), adapter_name="kohya")  # diffusers' kohya branch
    try:
        assert_same_deltas(deltas(pipe.unet, "kohya"), expected_deltas(state))
    finally:
        pipe.delete_adapters("kohya")


@pytest.mark.slow  # three tiny-pipeline samplings: ~10 s on 2 idle cores
def test_kohya_file_changes_the_pipeline_as_the_checkpoint_does(exported_run, tmp_path):
    from rlfh.run.export import export

    run, ckpt, pipe, _, _ = exported_run
    done = export(run, "kohya", tmp_path / "kohya.safetensors")
    base = latents(pipe)
    pipe.load_lora_weights(str(done.path), adapter_name="kohya")
    kohya_latents = latents(pipe)
    pipe.delete_adapters("kohya")
    pipe.load_lora_weights(str(ckpt / "pytorch_lora_weights.safetensors"), adapter_name="own")
    own_latents = latents(pipe)
    pipe.delete_adapters("own")
    torch.testing.assert_close(kohya_latents, own_latents, rtol=1e-4, atol=1e-4)
    assert (kohya_latents - base).abs().max() > 0.05


def test_peft_folder_loads_with_peft(exported_run, tmp_path):
    from peft import PeftModel

    from rlfh.run.export import export

    run, _, _, state, clean_unet = exported_run
    done = export(run, "peft", tmp_path / "peft")
    assert (done.path / "adapter_config.json").is_file() and done.card == done.path / "README.md"
    model = PeftModel.from_pretrained(copy.deepcopy(clean_unet), str(done.path))
    assert json.loads((done.path / "adapter_config.json").read_text())["lora_alpha"] == ALPHA
    assert_same_deltas(deltas(model.base_model.model, "default"), expected_deltas(state))


def test_cli_diffusers_export_with_model_card(exported_run, capsys):
    from rlfh.cli.main import main

    run, ckpt, _, _, _ = exported_run
    assert main(["export", str(run), "--format", "diffusers"]) == 0
    out = run / "export" / f"{ckpt.name}-diffusers"
    lora = out / f"run-{ckpt.name}-diffusers.safetensors"
    assert lora.read_bytes() == (ckpt / "pytorch_lora_weights.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    for fact in ("base_model:", "loss: dpo", "rewards: ", "rounds: 2 of", f"rank {RANK}, alpha {ALPHA:g}"):
        assert fact in card, fact
    assert "facescore: model 0.625 [0.5, 0.75]" in card  # the run's eval.json
    assert "HcP layer (model.hcp) is not exportable" in card
    assert "HcP layer (model.hcp) is not exportable" in capsys.readouterr().err


def test_full_fine_tune_is_one_unet_file(exported_run, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from rlfh.run.checkpoints import write_file_manifest
    from rlfh.run.export import ExportError, export

    unet = exported_run[4]
    ckpt = tmp_path / "run" / "checkpoints" / "round-000001"
    unet.save_pretrained(ckpt / "unet", max_shard_size="200KB")  # sharded: the export joins the shards
    assert len(list((ckpt / "unet").glob("*.safetensors"))) > 1
    (ckpt / "trainer_state.json").write_text(json.dumps({"round": 1}))
    write_file_manifest(ckpt)
    with pytest.raises(ExportError, match="full fine-tune"):
        export(ckpt, "kohya", tmp_path / "k.safetensors")
    done = export(ckpt, "diffusers", tmp_path / "unet.safetensors")
    with safe_open(str(done.path), framework="pt") as f:
        loaded = UNet2DConditionModel.from_config(json.loads(f.metadata()["config"]))
        loaded.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    for (name, a), b in zip(unet.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert "full-fine-tune" in done.card.read_text()


def test_errors_name_the_path(exported_run, tmp_path, capsys):
    import shutil

    from rlfh.cli.main import main

    missing = tmp_path / "nope"
    assert main(["export", str(missing), "--format", "kohya"]) == 2
    assert f"{missing}: no such run directory or checkpoint" in capsys.readouterr().err

    _, ckpt, _, _, _ = exported_run
    torn = tmp_path / "torn"
    shutil.copytree(ckpt, torn)
    lora = torn / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:-100])
    assert main(["export", str(torn), "--format", "kohya"]) == 2
    err = capsys.readouterr().err
    assert "corrupt checkpoint" in err and str(lora) in err

    (torn / "files.json").unlink()  # no manifest to check against: the file itself is unreadable
    (torn / "files.json").write_text("{}")
    assert main(["export", str(torn), "--format", "kohya"]) == 2
    assert f"{lora}: not a readable safetensors file" in capsys.readouterr().err

    assert main(["export", str(tmp_path), "--format", "kohya"]) == 2
    assert "not an rlfh checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- SD3: the transformer's LoRA


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3_dir, tmp_path_factory):
    """An SD3 run directory whose one checkpoint holds a LoRA of diffusers' SD3 targets written by the family
    (tests/families/lora_check.py: it loads with the stock ``load_lora_weights`` and moves its output), and
    that stock pipeline's latents with it."""
    from diffusers import StableDiffusion3Pipeline

    from families.sd3 import SD3
    from rlfh.config.schema import load_config, save_config
    from rlfh.run.checkpoints import checkpoint_dir, mark_latest, write_file_manifest
    from tests.conftest import REPO
    from tests.families.lora_check import assert_lora_loads_in_stock_pipeline

    run = tmp_path_factory.mktemp("export-sd3") / "run"
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.path=rlfh:tiny-sd3", f"run_dir={run}"])
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    ckpt = checkpoint_dir(run, 1)
    ckpt.mkdir(parents=True)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    assert_lora_loads_in_stock_pipeline(SD3(), tiny_sd3_dir, stock, ckpt, lora_b_std=0.2)
    (ckpt / "trainer_state.json").write_text(json.dumps({"round": 1, "policy_version": 1}))
    write_file_manifest(ckpt)
    mark_latest(run, ckpt)
    with_lora = sd3_latents(stock)
    stock.delete_adapters(stock.get_active_adapters())
    return run, ckpt, stock, with_lora


def sd3_latents(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=2, height=64, width=64, guidance_scale=1.0, output_type="latent")
    return pipe("a photo of a person", generator=g, **kw).images


def test_sd3_diffusers_and_peft_exports_load_and_move_the_stock_pipeline(sd3_run, tmp_path):
    """The diffusers file loads with ``StableDiffusion3Pipeline.load_lora_weights`` and the peft folder with
    ``PeftModel.from_pretrained(pipe.transformer, DIR)``; each gives the checkpoint's own output, not the base's;
    the card names the family and the denoiser."""
    from peft import PeftModel

    from rlfh.run.export import export

    run, _, stock, with_lora = sd3_run
    base = sd3_latents(stock)
    assert (with_lora - base).abs().max() > 1e-2
    done = export(run, "diffusers", tmp_path / "sd3.safetensors")
    stock.load_lora_weights(str(done.path), adapter_name="exported")
    torch.testing.assert_close(sd3_latents(stock), with_lora, rtol=0, atol=1e-5)
    stock.delete_adapters("exported")
    card = done.card.read_text()
    assert "model family: sd3" in card and "LoRA of the transformer" in card and "sd3]" in card

    peft_dir = export(run, "peft", tmp_path / "peft").path
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 2.0 and "attn.add_q_proj" in config["target_modules"]
    assert "PeftModel.from_pretrained(pipe.transformer" in (peft_dir / "README.md").read_text()
    model = PeftModel.from_pretrained(copy.deepcopy(stock.transformer), str(peft_dir))
    clean, stock.transformer = stock.transformer, model.base_model.model  # the adapted modules, in place
    try:
        torch.testing.assert_close(sd3_latents(stock), with_lora, rtol=0, atol=1e-5)
    finally:
        stock.transformer = clean


def test_sd3_kohya_export_is_refused_with_the_reason(tmp_path):
    """A checkpoint holding a transformer LoRA as the SD3 family writes it (no model needed to write one)."""
    from families.sd3 import SD3
    from rlfh.config.schema import load_config, save_config
    from rlfh.run.checkpoints import checkpoint_dir, write_file_manifest
    from rlfh.run.export import ExportError, export
    from tests.conftest import REPO

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(REPO / "configs" / "tiny.yaml", ["model.path=rlfh:tiny-sd3"]), run / "config.yaml")
    ckpt = checkpoint_dir(run, 1)
    ckpt.mkdir(parents=True)
    module = "transformer_blocks.0.attn.to_q"
    state = {f"{module}.lora_A.weight": torch.ones(4, 8), f"{module}.lora_B.weight": torch.ones(8, 4)}
    SD3().save_lora(ckpt, state, {"r": 4, "lora_alpha": 2.0, "target_modules": ["attn.to_q"]})
    (ckpt / "trainer_state.json").write_text(json.dumps({"round": 1}))
    write_file_manifest(ckpt)
    with pytest.raises(ExportError, match="kohya is not written for a LoRA of the sd3 transformer") as e:
        export(ckpt, "kohya", tmp_path / "k" / "sd3.safetensors")
    assert "converts no kohya keys" in str(e.value) and str(ckpt) in str(e.value)
    assert not (tmp_path / "k").exists()  # nothing written

"""A checkpoint's policy in the formats other tools load: ``rlfh export RUN_DIR|CHECKPOINT --format F``.

    diffusers  the LoRA as the stock pipeline's ``load_lora_weights`` reads it (the checkpoint's own file)
    kohya      the LoRA in kohya's layout (``lora_unet_*`` keys, ``.lora_down.weight``, ``.lora_up.weight``,
               ``.alpha``), what ComfyUI's LoraLoader, A1111 / Forge and kohya's sd-scripts read
    peft       a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for the
               denoiser: ``PeftModel.from_pretrained(pipe.unet, DIR)`` (``pipe.transformer`` on SD3)

The denoiser is the UNet (SD1.5, SDXL: ``unet.*`` keys) or the flow transformer (SD3: ``transformer.*``
keys, peft's names, as diffusers' train_dreambooth_lora_sd3.py saves them). A full fine-tune (a
checkpoint with ``unet/`` or ``transformer/`` instead of a LoRA) exports its whole denoiser as one
``.safetensors`` file (diffusers' keys, its config in the file's metadata), what ComfyUI's
"Load Diffusion Model" reads. The key maps are diffusers' own (``convert_unet_state_dict_to_peft``,
``convert_state_dict_to_kohya``), so the files load back through diffusers' loaders unchanged. kohya's
layout is written for UNets only: diffusers' ``StableDiffusion3Pipeline.load_lora_weights`` converts no
kohya keys (its kohya converters are the UNets' and FLUX's), so a kohya file of the SD3 transformer
would load nowhere it can be checked, and is refused with that reason.

Not exportable, and said so: the HcP layer (``hcp.safetensors``: no LoRA loader has a place for it),
the EMA and the EMA reference (training state), DeepSpeed's optimizer state. A model card,
``README.md``, is written beside the export: base model, rewards, loss, rounds, and the run's
evaluation (``RUN_DIR/eval/eval.json``) when there is one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

FORMATS = ("diffusers", "kohya", "peft")
LORA_FILE = "pytorch_lora_weights.safetensors"
# the denoiser folders / LoRA key prefixes of diffusers' pipelines: the UNet's, and the flow transformer's
DENOISERS = ("unet", "transformer")
KOHYA_DENOISER = "unet"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# files of a checkpoint that hold training state or parts no LoRA loader has a place for
NOT_EXPORTED = {
    "hcp.safetensors": "the HcP layer (model.hcp) is not exportable: diffusers', kohya's and peft's LoRA loaders "
    "have no place for it, so the export holds the LoRA alone (with model.hcp.mode=residual it samples "
    "differently from the trained policy)",
    "ema.safetensors": "the EMA weights (learner.ema) are not exported: the export holds the trained policy's weights",
}


class ExportError(ValueError):
    """A path that holds no exportable checkpoint, a corrupt one, or a format the checkpoint has no form in."""


@dataclass
class Exported:
    """What :func:`export` wrote: the weights (a file, or the peft folder), the model card, and what was left out."""

    path: Path
    card: Path
    checkpoint: Path
    notes: list[str] = field(default_factory=list)


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` means: a checkpoint folder (``trainer_state.json``), verified against its
    manifest, or a run directory / its ``checkpoints`` folder (the latest intact checkpoint)."""
    from rlfh.run.checkpoints import checkpoints_root, is_complete, latest_checkpoint, verify

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such run directory or checkpoint")
    if (p / "trainer_state.json").is_file():
        problem = verify(p) if is_complete(p) else f"{p}: incomplete (no files.json)"
        if problem is not None:
            raise ExportError(f"{p}: corrupt checkpoint, not exported: {problem}")
        return p
    run_dir = p.parent if p.name == "checkpoints" else p
    if checkpoints_root(run_dir).is_dir():
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"{checkpoints_root(run_dir)}: no intact checkpoint to export")
        return found
    raise FileNotFoundError(
        f"{p}: not an rlfh checkpoint (no trainer_state.json) nor a run directory (no checkpoints/)"
    )


def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``file``; an unreadable file is an :class:`ExportError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(f"{file}: not a readable safetensors file ({e})") from None


@dataclass
class Lora:
    """A checkpoint's denoiser LoRA: peft keys (``<module>.lora_A.weight``), rank, alpha, target modules, and
    the denoiser they adapt (``unet`` or ``transformer``)."""

    peft: dict[str, torch.Tensor]
    rank: int
    alpha: float
    targets: list[str]
    notes: list[str]
    denoiser: str = "unet"


def read_lora(file: Path) -> Lora:
    """The LoRA of a checkpoint's diffusers file (keys in diffusers' old or peft form, alpha in its metadata)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, meta = read_safetensors(file)
    found = [d for d in DENOISERS if any(k.startswith(d + ".") for k in state)]
    if len(found) != 1:
        wanted = " or ".join(f"{d}.*" for d in DENOISERS)
        raise ExportError(f"{file}: {'keys of both denoisers' if found else 'no denoiser LoRA keys'} ({wanted}) in it")
    denoiser, cut = found[0], len(found[0]) + 1
    keys = {k[cut:]: v for k, v in state.items() if k.startswith(denoiser + ".")}
    # a UNet file may hold diffusers' old attention-processor names; a transformer's holds peft's
    peft = convert_unet_state_dict_to_peft(keys) if denoiser == "unet" else keys
    ranks = {v.shape[0] for k, v in peft.items() if ".lora_A." in k}
    adapter = {k[cut:]: v for k, v in json.loads(meta.get(LORA_ADAPTER_METADATA_KEY) or "{}").items()}
    rank = int(adapter.get("r") or max(ranks))
    notes = []
    if "lora_alpha" not in adapter:  # what load_lora_weights assumes for such a file, said as rlfh eval says it
        notes.append(f"{file} stores no LoRA alpha (written before rlfh kept it): exported with alpha = rank = {rank}")
    targets = adapter.get("target_modules") or sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in peft})
    return Lora(peft, rank, float(adapter.get("lora_alpha", rank)), list(targets), notes, denoiser)


def write_kohya(lora: Lora, out: Path) -> None:
    """diffusers' peft -> kohya converter, with the LoRA's alpha (the converter writes alpha = rank)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya = convert_state_dict_to_kohya({f"{KOHYA_DENOISER}.{k}": v for k, v in lora.peft.items()})
    for k in kohya:
        if k.endswith(".alpha"):
            kohya[k] = torch.tensor(lora.alpha, dtype=torch.float32)
    # sd-scripts' metadata keys, which A1111's and ComfyUI's LoRA pages show
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank), "ss_network_alpha": str(lora.alpha)}
    save_file({k: v.contiguous() for k, v in kohya.items()}, out, metadata=meta)


def write_peft(lora: Lora, out: Path, base_model: str | None) -> None:
    """peft's adapter folder, as ``PeftModel.save_pretrained`` lays it out."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.targets, base_model_name_or_path=base_model
    ).save_pretrained(str(out))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in lora.peft.items()}, out / PEFT_WEIGHTS)


def write_full_unet(unet_dir: Path, out: Path) -> None:
    """A full fine-tune's denoiser folder (``unet/`` or ``transformer/``, sharded or not) as one file, its
    config in the metadata."""
    from safetensors.torch import save_file

    shards = sorted(unet_dir.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{unet_dir}: no .safetensors weights in the {unet_dir.name} folder")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(read_safetensors(shard)[0])
    config = unet_dir / "config.json"
    meta = {"format": "pt", **({"config": config.read_text()} if config.is_file() else {})}
    save_file(state, out, metadata=meta)


def default_out(checkpoint: Path, fmt: str, full: str | None) -> Path:
    """RUN_DIR/export/<checkpoint>-<format>/<run>-<checkpoint>-<format>.safetensors (a folder for peft; the
    denoiser's folder name for a full fine-tune); a checkpoint outside a run directory exports beside itself."""
    run_dir = checkpoint.parent.parent
    root = run_dir if (run_dir / "config.yaml").is_file() else checkpoint.parent
    kind = full or fmt
    folder = root / "export" / f"{checkpoint.name}-{kind}"
    return folder if fmt == "peft" else folder / f"{root.name}-{checkpoint.name}-{kind}.safetensors"


def export(
    path: str | Path, fmt: str, out: str | Path | None = None, eval_text: Callable[[dict], str] | None = None
) -> Exported:
    """Write the checkpoint ``path`` means (:func:`find_checkpoint`) in format ``fmt`` to ``out`` (default:
    :func:`default_out`), and the model card beside it; ``eval_text`` renders the run's ``eval.json`` for
    the card (``rlfh.eval.evaluate.format_summary``, passed in: rlfh.run does not import rlfh.eval)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    ckpt = find_checkpoint(path)
    has_lora = (ckpt / LORA_FILE).is_file()
    full = None if has_lora else next((d for d in DENOISERS if (ckpt / d).is_dir()), None)
    if not full and not has_lora:
        raise ExportError(f"{ckpt}: neither a LoRA ({LORA_FILE}) nor a full denoiser (unet/, transformer/) to export")
    if full and fmt != "diffusers":
        raise ExportError(
            f"{ckpt} is a full fine-tune ({full}/, no LoRA): --format {fmt} writes LoRAs; "
            f"--format diffusers writes the whole {full} as one .safetensors"
        )
    target = Path(out) if out else default_out(ckpt, fmt, full)
    if fmt != "peft" and target.suffix != ".safetensors":
        raise ExportError(f"--out {target}: a {fmt} export is one file; name it *.safetensors")
    notes = [f"{ckpt / name}: {why}" for name, why in NOT_EXPORTED.items() if (ckpt / name).is_file()]
    run = run_facts(ckpt, eval_text)
    lora = None if full else read_lora(ckpt / LORA_FILE)
    if lora is not None and fmt == "kohya" and lora.denoiser != KOHYA_DENOISER:
        raise ExportError(
            f"{ckpt}: --format kohya is not written for a LoRA of the {run['family']} {lora.denoiser}: diffusers' "
            f"kohya key map (convert_state_dict_to_kohya) is the UNets', and StableDiffusion3Pipeline."
            f"load_lora_weights converts no kohya keys, so no loader rlfh can check reads such a file; "
            f"use --format diffusers (load_lora_weights) or --format peft"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    if full:
        write_full_unet(ckpt / full, target)
    elif fmt == "diffusers":
        shutil.copyfile(ckpt / LORA_FILE, target)
    elif fmt == "kohya":
        write_kohya(lora, target)
    else:
        write_peft(lora, target, run.get("model"))
    notes += lora.notes if lora else []
    card = (target if fmt == "peft" else target.parent) / "README.md"
    card.write_text(model_card(ckpt, fmt, target, run, lora, notes, full))
    return Exported(target, card, ckpt, notes)


def run_facts(ckpt: Path, eval_text: Callable[[dict], str] | None = None) -> dict[str, Any]:
    """What the card states of the run: its config summary, the checkpoint's round, its evaluation."""
    from rlfh.run.status import RunDirError, config_summary

    run_dir = ckpt.parent.parent
    facts: dict[str, Any] = {"run_dir": str(run_dir), "notes": []}
    if (run_dir / "config.yaml").is_file():
        try:
            summary, notes = config_summary(run_dir)
            facts.update(summary)
            facts["notes"] += notes
        except RunDirError as e:
            facts["notes"].append(str(e))
    facts["family"] = model_family(run_dir, facts.get("model"))
    state = json.loads((ckpt / "trainer_state.json").read_text())
    facts["round"] = state.get("round")
    facts["policy_version"] = state.get("policy_version")
    eval_file = run_dir / "eval" / "eval.json"
    if eval_file.is_file() and eval_text is not None:
        try:
            facts["eval"] = eval_text(json.loads(eval_file.read_text()))
        except (ValueError, KeyError, TypeError) as e:
            facts["notes"].append(f"{eval_file}: unreadable, not on the card ({e!r})")
    return facts


def model_family(run_dir: Path, model: str | None) -> str:
    """The run's model family: ``model.family`` of its config, or read from ``model.path`` where that needs no
    download (``rlfh:tiny-*``, a local folder or file); "unknown" otherwise."""
    import yaml

    from families import detect_family

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        named = ((config or {}).get("model") or {}).get("family")
    except (OSError, yaml.YAMLError, AttributeError):
        named = None
    if named or not model:
        return named or "unknown"
    if not (model.startswith("rlfh:") or Path(model).exists()):
        return "unknown"  # a hub id: the card names the base model, and the family is not fetched for it
    try:
        return detect_family(model).name
    except (OSError, ValueError, NotImplementedError):
        return "unknown"


LOADING = {
    "diffusers": "pipe.load_lora_weights({path!r})",
    "kohya": "ComfyUI: models/loras/ + LoraLoader; A1111 / Forge: models/Lora/ and <lora:{stem}:1>; "
    "diffusers: pipe.load_lora_weights({path!r})",
    "peft": "PeftModel.from_pretrained(pipe.{denoiser}, {path!r})",
    "full": "ComfyUI: models/diffusion_models/ + Load Diffusion Model; diffusers: the class its config names "
    "(UNet2DConditionModel, SD3Transformer2DModel).from_config(json.loads(metadata['config'])) then load_state_dict",
}


def model_card(
    ckpt: Path,
    fmt: str,
    target: Path,
    run: dict[str, Any],
    lora: Lora | None,
    notes: list[str],
    full: str | None = None,
) -> str:
    """README.md of an export: the Hugging Face card header, what the file is, how the run trained, its eval."""
    base = run.get("model") or "unknown (no config.yaml beside the checkpoints)"
    denoiser = lora.denoiser if lora else full or "unet"
    what = (
        f"LoRA of the {denoiser} (rank {lora.rank}, alpha {lora.alpha:g}, modules {', '.join(lora.targets)}) "
        f"in {fmt} format"
        if lora
        else f"the fully fine-tuned {denoiser}, one .safetensors file (diffusers' keys)"
    )
    family = run.get("family") or "unknown"
    rewards = ", ".join(f"{r['name']} ({r['target']}, weight {r['weight']:g})" for r in run.get("rewards") or [])
    rounds = f"{run['round'] if run.get('round') is not None else 'unknown'}" + (
        f" of {run['num_rounds']}" if run.get("num_rounds") else ""
    )
    title = f"{Path(run['run_dir']).name} / {ckpt.name}" if run.get("model") else ckpt.name
    lines = [
        "---",
        *([f"base_model: {run['model']}"] if run.get("model") else []),
        f"library_name: {'peft' if fmt == 'peft' else 'diffusers'}",
        f"tags: [rlfh, text-to-image, {'lora' if lora else 'full-fine-tune'}"
        + ("]" if family == "unknown" else f", {family}]"),
        "---",
        "",
        f"# {title}",
        "",
        f"{what}, exported by `rlfh export` from `{ckpt}`.",
        "",
        f"Load: {LOADING[fmt if lora else 'full'].format(path=target.name, stem=target.stem, denoiser=denoiser)}",
        "",
        "## Training",
        "",
        f"- base model: {base}",
        f"- model family: {family}",
        f"- loss: {run.get('loss') or 'unknown'}"
        + (f" (beta {run['beta']:g})" if run.get("beta") and "dpo" in (run.get("loss") or "") else ""),
        f"- rewards: {rewards or 'unknown'}",
        f"- rounds: {rounds} (policy version {run.get('policy_version')})",
    ]
    if run.get("samples_per_round"):
        lines.append(f"- samples per round: {run['samples_per_round']}")
    if run.get("regions"):
        lines.append(f"- regions: {', '.join(run['regions'])}" + (f" ({run['fairness']})" if run["fairness"] else ""))
    if run.get("eval"):
        lines += ["", "## Evaluation (`rlfh eval`, RUN_DIR/eval/eval.json)", "", "```", run["eval"], "```"]
    if notes or run["notes"]:
        lines += ["", "## Not exported / notes", ""] + [f"- {n}" for n in notes + run["notes"]]
    return "\n".join(lines) + "\n"

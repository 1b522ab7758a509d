"""The HcP layer on the learner's UNet (arXiv 2403.05239; the loss and our reading: rlfh/losses/hcp.py).

:class:`HcPProcessor` replaces the attention processor of a cross-attention layer (``attn2``) through
diffusers' processor API. It computes the layer's own output exactly as diffusers' default
``AttnProcessor2_0`` does (it calls it) and, with ``model.hcp.mode: residual`` (default, the paper's
reading: the layer is trained in a frozen model and changes what it generates), adds the human-centric
attention's output through a zero-initialised projection:

    out = CrossAttn(z, C) + W_o (M_h V),   M_h = softmax(Q K_h^T / sqrt(d)) per head,  V = attn.to_v(C)

with K_h = phi(C), phi = Linear(D_text, hidden) -> SiLU -> Linear(hidden, heads * d), and W_o = Linear(heads *
d, out) starting at zero, one of each per hooked layer: a fresh layer leaves the UNet's prediction exactly as
it was, and training (the run's loss through W_o, the alignment loss through phi) makes it change generation.
V is the layer's own value projection (LoRA included). With ``mode: observe`` the layer adds nothing: the
UNet's prediction is the same with or without it, so a sampler without the layer (the rollout actors, which
load only the LoRA) samples the same policy, and the alignment loss trains only through Q (the LoRA on to_q
and upstream) and phi.

Either way, while gradients are on (the policy's training forward; the reference and every sampling call run
without), it records M_h averaged over heads, (B, N, L). C is the whole prompt embedding (B, 77, D_text) the
layer attends to; the human-centric tokens are picked afterwards from M_h (:meth:`HcP.token_mask`), so the
softmax runs over all 77 tokens and the human map S is the share of attention the human words take. Q is the
layer's own query (LoRA included).

The reference (the UNet with its LoRA off, :meth:`rlfh.learner.policy.PolicyWeights.adapters_off`) runs
without the residual: the base model is the model without the layer.

Layers hooked: every ``attn2`` whose downsampling factor from the latent (down_blocks.i: 2^i, the
mid block: the deepest, up_blocks.i: mirrored) has a weight > 0 in ``model.hcp.scale_weights``.
The phi and W_o weights are trainable parameters of the UNet (``...attn2.processor.phi.*``, ``...proj.*``): the
optimizer, DeepSpeed's checkpoint (resume) and the EMA hold them with the LoRA; the exported checkpoint writes
them to ``hcp.safetensors`` beside the LoRA file, which keeps its plain diffusers layout; :func:`load_hcp_into`
puts a trained layer on a pipeline for generation (``rlfh eval``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rlfh.config.schema import hcp_factor
from rlfh.losses.hcp import hcp_alignment_loss, human_map

HCP_FILE = "hcp.safetensors"


def layer_factor(name: str, n_down: int, n_up: int) -> int | None:
    """The downsampling factor from the latent of the UNet module ``name`` (None outside the blocks)."""
    if name.startswith("mid_block."):
        return 2 ** (n_down - 1)
    m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if m is None:
        return None
    i = int(m.group(2))
    return 2**i if m.group(1) == "down" else 2 ** (n_up - 1 - i)


class HcPProcessor(nn.Module):
    """Cross-attention processor: diffusers' ``AttnProcessor2_0`` output, plus the human-centric attention's
    through a zero-initialised projection (``residual``), and M_h recorded for the loss.

    Args:
        name: the ``attn2`` module's name in the UNet (key of its recorded map).
        factor: its downsampling factor from the latent.
        text_dim, inner_dim: width of the text embeddings and of the layer's queries (heads * d).
        hidden: width of phi.
        store: the dict the maps go to, shared with :class:`HcP`.
        out_dim: width of the layer's output (``attn.to_out[0]``); with ``residual``.
        residual: add W_o (M_h V) to the output (``model.hcp.mode: residual``); False: output-neutral.
    """

    def __init__(
        self,
        name: str,
        factor: int,
        text_dim: int,
        inner_dim: int,
        hidden: int,
        store: dict,
        out_dim: int = 0,
        residual: bool = False,
    ):
        from diffusers.models.attention_processor import AttnProcessor2_0

        super().__init__()
        self.name, self.factor, self.store = name, factor, store
        self.phi = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, inner_dim))
        self.proj = None
        if residual:
            self.proj = nn.Linear(inner_dim, out_dim)
            nn.init.zeros_(self.proj.weight)  # a fresh layer adds exactly 0
            nn.init.zeros_(self.proj.bias)
        self.active = True  # False: the reference's forward, without the residual
        self.base = AttnProcessor2_0()

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None:
            return out
        record = torch.is_grad_enabled()
        add = self.proj is not None and self.active
        if not (record or add):
            return out
        m = self.head_attention(attn, hidden_states, encoder_hidden_states)  # (B, heads, N, L)
        if record:
            # the latest forward wins: a checkpointed block's recompute in backward overwrites a map
            # already used, never one waiting for its loss
            self.store[self.name] = (self.factor, m.mean(1))
        if add:
            out = out + self.residual(attn, m, encoder_hidden_states).to(out.dtype) / attn.rescale_output_factor
        return out

    def context(self, attn, context: torch.Tensor) -> torch.Tensor:
        return attn.norm_encoder_hidden_states(context) if attn.norm_cross else context

    def human_attention(self, attn, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """M_h averaged over the heads, (B, N, L): the map the alignment loss reads."""
        return self.head_attention(attn, hidden_states, context).mean(1)

    def head_attention(self, attn, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """M_h (B, heads, N, L): softmax over the L tokens of Q K_h^T / sqrt(d), per head."""
        context = self.context(attn, context)
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)  # (B, N, heads * d)
        k = self.phi(context.to(self.phi[0].weight.dtype))  # (B, L, heads * d)
        d = q.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, d).transpose(1, 2).float()  # (B, heads, N, d)
        k = k.view(b, -1, attn.heads, d).transpose(1, 2).float()  # (B, heads, L, d)
        return torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)

    def residual(self, attn, m: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """W_o (M_h V): the human-centric attention's output, (B, N, out)."""
        v = attn.to_v(self.context(attn, context))  # (B, L, heads * d)
        b, _, inner = v.shape
        v = v.view(b, -1, attn.heads, inner // attn.heads).transpose(1, 2).float()  # (B, heads, L, d)
        h = (m @ v).transpose(1, 2).reshape(b, -1, inner)  # (B, N, heads * d)
        return self.proj(h.to(self.proj.weight.dtype))


class HcP:
    """The HcP layers of one UNet, their recorded maps and the alignment term.

    Args:
        unet: the learner's UNet (with its LoRA already added).
        hc: ``model.hcp``.
        tokenizer: the pipeline's first CLIP tokenizer (token positions of the human words).

    Raises:
        RuntimeError: no cross-attention layer at a weighted factor.
    """

    def __init__(self, unet, hc, tokenizer):
        self.cfg, self.tokenizer = hc, tokenizer
        self.weights = {hcp_factor(k): float(v) for k, v in hc.scale_weights.items() if float(v) > 0}
        self.words = {w.lower() for w in hc.words}
        self.store: dict[str, tuple[int, torch.Tensor]] = {}
        self._masks: dict[str, torch.Tensor] = {}
        n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
        text_dim = unet.config.cross_attention_dim
        self.processors: dict[str, HcPProcessor] = {}
        found: set[int] = set()
        for name, module in unet.named_modules():
            if not name.endswith(".attn2"):
                continue
            f = layer_factor(name, n_down, n_up)
            found.add(f)
            if f in self.weights:
                proc = HcPProcessor(
                    name,
                    f,
                    text_dim,
                    module.to_q.out_features,
                    hc.hidden,
                    self.store,
                    module.to_out[0].out_features,
                    hc.mode == "residual",
                )
                module.set_processor(proc.to(unet.device))
                self.processors[name] = proc
        if not self.processors:
            raise RuntimeError(
                f"model.hcp.scale_weights={dict(hc.scale_weights)} hooks no cross-attention layer: this "
                f"UNet has them at downsampling factors {sorted(x for x in found if x)}"
            )

    def token_mask(self, prompts: list[str]) -> torch.Tensor:
        """(B, L) bool: the tokens of each prompt's words in ``model.hcp.words``; all its words' tokens
        when it has none of them (BOS, EOS and padding never)."""
        out = []
        for prompt in prompts:
            if prompt not in self._masks:
                tok = self.tokenizer
                ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
                pieces = tok.convert_ids_to_tokens(ids)
                content = [
                    i for i, t in enumerate(ids) if t not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                ]
                human, word = [], []
                for i in content:
                    word.append(i)
                    if pieces[i].endswith("</w>"):  # a word's last BPE piece
                        if "".join(pieces[j].removesuffix("</w>") for j in word).lower() in self.words:
                            human.extend(word)
                        word = []
                mask = torch.zeros(len(ids), dtype=torch.bool)
                mask[human or content] = True
                self._masks[prompt] = mask
            out.append(self._masks[prompt])
        return torch.stack(out)

    def take_maps(self) -> list[tuple[int, torch.Tensor]]:
        """The (factor, M_h) recorded by the last training forward, one per hooked layer; cleared."""
        maps = list(self.store.values())
        self.store.clear()
        return maps

    def term(
        self, t: torch.Tensor, prompts: list[str], prior: torch.Tensor | None, metrics: dict[str, float]
    ) -> torch.Tensor | None:
        """coef * L_hca for the micro-batch whose policy forward just ran, or None (no prior, none kept).

        Args:
            t: (B,) training timesteps of the batch's rows.
            prompts: the rows' prompts.
            prior: (B, 1, h, w) pose priors (rlfh/data/pose_prior.py), or None when the batch has none.
        """
        maps = self.take_maps()
        if prior is None or not maps:
            return None
        lo, hi = self.cfg.timesteps
        t = t.to(prior.device)
        posed = prior.flatten(1).amax(1) > 0
        keep = posed & (t >= lo) & (t <= hi)
        mask = self.token_mask(prompts).to(prior.device)
        s = [(f, human_map(m, mask)) for f, m in maps]
        loss = hcp_alignment_loss(s, prior, self.weights, keep)
        metrics["hcp/posed_fraction"] = float(posed.float().mean())
        metrics["hcp/kept_fraction"] = float(keep.float().mean())
        if loss is None:
            return None
        metrics["loss/hcp"] = float(loss.detach())
        return self.cfg.coef * loss

    def set_active(self, active: bool) -> None:
        """Switch the layers' residual on (the policy) or off (the reference: the base model has no layer)."""
        for proc in self.processors.values():
            proc.active = active

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The layers' weights (phi, and W_o with ``mode: residual``), keyed ``<attn2 module
        name>.processor.<phi|proj>.<param>`` (CPU, float32)."""
        return {
            f"{name}.processor.{k}": v.detach().float().cpu().contiguous()
            for name, proc in self.processors.items()
            for k, v in proc.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_dict` gave (e.g. ``hcp.safetensors``); every layer's weights must be there."""
        mine = self.state_dict()
        if set(state) != set(mine):
            raise RuntimeError(
                f"HcP weights do not match this UNet's HcP layers (model.hcp.mode and scale_weights as trained?): "
                f"missing {sorted(set(mine) - set(state))[:3]}, unexpected {sorted(set(state) - set(mine))[:3]}"
            )
        for name, proc in self.processors.items():
            prefix = f"{name}.processor."
            proc.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def load_hcp_into(pipe, directory, hc) -> HcP | None:
    """Put the trained HcP layer of a checkpoint (``hcp.safetensors`` in ``directory``, the LoRA's folder) on
    ``pipe``'s UNet for generation, with ``model.hcp`` ``hc``; None when the folder has none."""
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(directory)
    path = path / HCP_FILE if path.is_dir() else path.with_name(HCP_FILE)
    if not path.is_file():
        return None
    from families import family_of

    unet = family_of(pipe).model(pipe)  # HcP is refused for families without cross-attention UNets
    hcp = HcP(unet, hc, pipe.tokenizer)
    state = load_file(str(path))
    hcp.load_state_dict(state)
    dtype = unet.dtype
    for proc in hcp.processors.values():
        proc.to(dtype)
    return hcp

"""`pass`: PASS, a recurrent hypernetwork reading the visual prompt and the weights' statistics decides the
channels of every group under the FLOPs budget (METHODS.md 2). Module named `pass_`: `pass` is a keyword.

The search trains the hypernetwork, its prompt encoder and the prompt (the backbone frozen), then runs the
hypernetwork once and keeps channels by bisection on a global logit offset so the network meets
`pruning.flops_ratio`. `search.pt` keeps the hypernetwork and the prompt; finetune starts from the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

from .registry import ChannelDecision, register, setting
from .structured import StructuredMethod, budget

BUDGET_LOSSES = ("square", "abs", "log")   # pruning.hypernet.BUDGET_LOSSES (tests/test_config.py checks)


@dataclass
class PassSettings:
    use_prompt: bool = setting(True, "ablation: false = no prompt on the inputs, the hypernetwork sees nothing")
    recurrent: bool = setting(True, "ablation: false = each group decided from its own input, no LSTM state")
    use_stats: bool = setting(True, "ablation: false = no weight statistics (step embedding only, no prior)")
    embed_dim: int = setting(64, "d: width of the statistics MLP phi and the step embedding")
    hidden: int = setting(128, "H: LSTM hidden size")
    init_bias: float = setting(3.0, "initial bias of the per-group heads (search starts from the full network)")
    budget_loss: str = setting("square", "square, abs or log")
    budget_weight: float = setting(2.0, "lambda: weight of the budget term")
    prompt_lr: float = setting(1e-3, "peak learning rate of the prompt (search.lr applies to the hypernetwork)")
    bn_train: bool = setting(False, "run the frozen backbone's BatchNorm in train mode during search")


@register
class Pass(StructuredMethod):
    name = "pass"
    trains = True
    about = "trains a prompt-conditioned recurrent hypernetwork that keeps channels under the FLOPs budget"
    settings = PassSettings
    choices = {"budget_loss": BUDGET_LOSSES}

    def search_prompt(self, cfg) -> bool:
        return bool(cfg[self.name].use_prompt)

    def finetune_prompt(self, cfg) -> bool:
        # the no-prompt ablation has no prompt anywhere
        return bool(cfg[self.name].use_prompt) and bool(cfg.finetune.prompt)

    def problems(self, cfg) -> list[str]:
        h = cfg[self.name]
        out = []
        if not (h.embed_dim > 0 and h.hidden > 0):
            out.append("pass.embed_dim and pass.hidden must be positive")
        if h.budget_weight < 0:
            out.append(f"pass.budget_weight={h.budget_weight}: must be >= 0")
        if h.prompt_lr <= 0:
            out.append(f"pass.prompt_lr={h.prompt_lr}: must be positive")
        return out

    def search(self, job) -> ChannelDecision:
        import torch

        from ..extract import choose_channels
        from ..pass_network import PassSearchNetwork

        cfg, h, prompt = job.cfg, job.cfg[self.name], job.prompt
        if cfg.engine.sync_bn and job.world_size > 1:
            # SyncBatchNorm replaces the BatchNorm modules the masks are hooked on (and the frozen
            # backbone's BatchNorm runs in eval mode anyway).
            raise ValueError("engine.sync_bn=true is not supported in PASS search; drop it for this stage")
        net = PassSearchNetwork(job.backbone, res=cfg.data.res, prompt=prompt, pass_cfg=h,
                                flops_ratio=cfg.pruning.flops_ratio, residual=cfg.pruning.residual,
                                head=job.head_name)
        head = list(job.backbone.get_submodule(job.head_name).parameters())
        if job.train_head:  # a fresh classifier (head=new) cannot stay frozen: it trains with the hypernetwork
            for p in head:
                p.requires_grad_(True)
        net = job.prepare(net)
        hyper, prompt_params = net.trainable_parameters()
        params = [{"params": hyper}]
        if prompt_params:
            params.append({"params": prompt_params, "lr": h.prompt_lr})
        if job.train_head:
            params.append({"params": head})
        job.say(f"search: {len(net.graph.groups)} channel groups, hypernetwork {sum(p.numel() for p in hyper):,} "
                f"parameters, prompt {prompt.effective_parameters if prompt else 0:,} effective parameters")
        start = net.hard_masks()
        result = job.fit(net, params)
        net.eval()
        with torch.no_grad():
            logits = [l.cpu() for l in net.logits()]
        net.masks.remove()  # the backbone is extracted from next: no hooks may travel with it
        end = [(l > 0).float() for l in logits]
        kept = choose_channels(logits, net.flops, cfg.pruning.flops_ratio, **budget(cfg))
        extra = {
            "mask_digest_per_rank": job.same_on_every_rank(end, "hypernetwork masks"),
            "mask_flops_ratio_start": float(net.flops.ratio([m.sum() for m in start])),
            "mask_flops_ratio_end": float(net.flops.ratio([m.sum() for m in end])),
            "mask_channels_changed": int(sum((a.cpu() != b).sum() for a, b in zip(start, end))),
            "offset_bisection": "global logit offset, FLOPs <= target",
        }
        job.say(f"search: hypernetwork masks keep {extra['mask_flops_ratio_end']:.3f} of the dense FLOPs "
                f"({extra['mask_channels_changed']} channels changed since the start); extraction keeps "
                f"{net.flops.ratio([len(k) for k in kept]):.3f} (target {cfg.pruning.flops_ratio})")
        state = {"hypernet": net.hypernet.state_dict(),
                 "prompt": net.prompt.program.detach().cpu() if net.prompt is not None else None}
        return ChannelDecision(graph=net.graph, flops=net.flops, kept=kept, prompt=net.prompt, state=state,
                               fit=result, extra=extra)

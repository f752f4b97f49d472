"""Pure-bf16 AdamW (stochastic rounding, bfloat16 moments) on DTensor parameters: the checks
test_fsdp2.py runs in every process of a group, listed in dtensor_checks.CHECKS.

Under sharding each process rounds its local shard with bits keyed by (the step's seed, the
parameter's index, the element's index in the shard), so the result is not bitwise the unsharded
one; it must follow an fp32 twin to bfloat16 accuracy, and a replicated plain parameter must stay
identical on every process (every process draws the same seed from an identically seeded generator).
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import dtensor_checks as checks
import fusedreg

# three steps of bfloat16 rounding (one ulp is 2**-8 relative) on weights of order 1
BF16_TOL = dict(atol=2.0**-6, rtol=2.0**-6)


def pure_bf16_under_fully_shard(rank, world_size, out_dir, device="cpu"):
    ours = checks._mlp(device).to(torch.bfloat16)
    theirs = checks._mlp(device)                      # same seed: the fp32 weights ours was rounded from
    theirs.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    checks._fully_shard(ours)
    gain = nn.Parameter(torch.full((3,), 1.5, dtype=torch.bfloat16, device=device))  # plain, replicated
    their_gain = nn.Parameter(gain.detach().float())
    opt = fusedreg.optim.AdamW([*ours.parameters(), gain], lr=checks.LR, weight_decay=checks.WEIGHT_DECAY,
                               max_grad_norm=checks.MAX_NORM, state_dtype=torch.bfloat16,
                               bf16_stochastic_round=True)
    ref = torch.optim.AdamW([*theirs.parameters(), their_gain], lr=checks.LR, weight_decay=checks.WEIGHT_DECAY)
    torch.manual_seed(1234)  # the same generator state on every process: the same seed per step
    for step in range(checks.STEPS):
        x = checks._batch(step, 0, device)  # the same batch everywhere: FSDP2 averages the gradients
        opt.zero_grad(set_to_none=True)
        (ours(x.to(torch.bfloat16)).float() * gain.float()).square().sum().backward()
        opt.step()
        ref.zero_grad(set_to_none=True)
        (theirs(x) * their_gain).square().sum().backward()
        torch.nn.utils.clip_grad_norm_([*theirs.parameters(), their_gain], checks.MAX_NORM)
        ref.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert isinstance(a, DTensor) and a.dtype == torch.bfloat16, (name, type(a), a.dtype)
        state = opt.state[a]
        assert all(isinstance(state[k], DTensor) and state[k].dtype == torch.bfloat16
                   for k in ("exp_avg", "exp_avg_sq")), name
        torch.testing.assert_close(a.full_tensor().float(), b.detach(), **BF16_TOL, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(gain.detach().float(), their_gain.detach(), **BF16_TOL)
    gathered = [torch.empty_like(gain.detach()) for _ in range(world_size)]
    dist.all_gather(gathered, gain.detach().contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered), "a replicated parameter diverged"

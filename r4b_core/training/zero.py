"""DeepSpeed ZeRO engines for the training stages (anneal and BPO), built the same way for both.

    from r4b_core.training.zero import deepspeed_engine
    engine, zero_optimizer = deepspeed_engine(model, torch_adamw, stage=2, grad_accum=4,
                                              grad_clip=1.0, use_bf16=False)

The caller passes a torch optimizer (so no DeepSpeed op is compiled) and keeps its own LR
scheduler on that optimizer; DeepSpeed reduces (averages) gradients across ranks, clips them at
`grad_clip` and steps the partitioned optimizer. `engine.module` is the bare model.
The process group must exist already (training/distributed.init_distributed(force=True)).
"""

from __future__ import annotations


def deepspeed_engine(model, optimizer, *, stage: int, grad_accum: int, grad_clip: float, use_bf16: bool):
    """Wrap model + torch optimizer in a DeepSpeed engine (ZeRO stage 2 or 3, no DeepSpeed
    optimizer); returns (engine, DeepSpeed's ZeRO optimizer)."""
    import warnings

    import deepspeed

    # DeepSpeed calls collectives that torch 2.13 deprecates, once per step per rank.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)",
                            category=FutureWarning)
    ops = vars(deepspeed.ops)
    # The CPU shared-memory allreduce op would JIT-compile for minutes on first use; gloo does the
    # job. A private dict (ENVIRONMENT.md "Training on CPU"): re-check on a DeepSpeed upgrade.
    compat = dict(ops.get("__compatible_ops__") or {})
    compat["deepspeed_shm_comm"] = False
    deepspeed.ops.__compatible_ops__ = compat
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,  # one collated micro-batch per call (it holds several rows)
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, ds_optimizer

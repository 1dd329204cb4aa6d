"""Training utilities shared by the SFT (anneal) and RL (BPO) stages; each module is small and
stands alone:

    distributed   init_distributed / teardown (one process, torchrun, PyTorchJob env), collectives
    packing       Sample, first-fit packing, collate with a block-diagonal causal mask
    optim         parameter groups (vision tower / projector / LLM) and the cosine LR schedule
    checkpoint    atomic, resumable checkpoints (model, optimizer, scheduler, RNG, data position)
"""

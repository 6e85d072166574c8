"""Training, stages 1 and 2 of the pipeline (spec -> config -> **train** -> cache -> sample -> metrics -> record).

    losses.py      stage-1 NLL, stage-2 objectives (strategies, norm control, perceptual terms, training-time CFG)
    perceptual.py  the perceptual distances of stage 2 (LPIPS-VGG, ConvNeXt V2, EfficientNet-Lite stand-ins)
    loop.py        `fit`: AdamW, warm-up + cosine, EMA, checkpoints, resume, non-finite-step guard, DDP
    stages.py      `train_flow` (stage 1, F) and `train_backward` (stage 2, G against the frozen F)
    cache.py       the artifact cache of what the stages train, keyed by config, and `train_stages` (F, then G,
                   from the cache or trained; one process or every rank of a torchrun job)
"""

"""The GAN application built on gankern's kernel library: models, data, quality metric, trainer and CLI.

    models       MLP and DCGAN generators/discriminators (fused or plain-PyTorch twins)
    data         the bundled digits, local MNIST-style files, the infinite sampler
    metrics      Fréchet distance in a small classifier's feature space, class coverage
    trainer      TrainConfig, the training step and train(cfg)
    checkpoint   the checkpoint format and the run folder (lock, atomic writes, metrics.jsonl)
    distributed  the trainer under torchrun (DistContext)
    cli          gankern train | sample | eval | bench | info

The kernel library (gankern.ops, nn, fuse, triton, ...) does not import this package.
"""

"""The GAN application built on gankern's kernel library: models, data, quality metric, trainer and CLI.

    models       MLP and DCGAN generators/discriminators (fused or plain-PyTorch twins); generate, BatchNorm
                 recalibration
    data         the bundled digits, local MNIST-style files, the infinite sampler
    metrics      Fréchet distance in a small classifier's feature space, class coverage
    config       TrainConfig: every training setting, its default, help text and check (validate)
    step         TrainStep: one D + G update (models, optimizers, precision, EMA) and its state_dict
    trainer      train(cfg) and the Trainer loop: progress output, samples, evaluation, checkpoints
    checkpoint   the checkpoint format and the run folder (lock, atomic writes, metrics.jsonl)
    distributed  the trainer under torchrun (DistContext)
    images       sample grids and the loss plot
    speed        timing the training step (--compare-torch, gankern bench --quick)
    cli          gankern train | sample | eval | bench | info

The kernel library (gankern.ops, nn, fuse, triton, ...) does not import this package.
"""

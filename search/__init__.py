"""The Optuna layer: search space, objective, studies in an RDB storage, and the worker loop."""

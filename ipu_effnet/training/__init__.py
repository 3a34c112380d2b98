"""Training: the loss-inside-forward wrapper, optimisers and their parameter groups, LR schedules, weight
averaging, checkpoints, the loop and the recipes (native, half-resolution + fine-tune, progressive).

Modules are imported where they are used (`from ipu_effnet.training.param_groups import param_groups`),
so importing this package stays cheap.
"""

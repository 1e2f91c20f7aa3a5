"""Training: the run's set-up (build.py), the loop (trainer.py), the compiled steps and their state,
optimizer, checkpoints, monitor, metrics, the device mesh and the stages around a distillation."""

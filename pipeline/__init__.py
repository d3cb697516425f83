"""vitfold.pipeline: the training-side libraries (adapters, adapt/fold, backbones, data, config and
recipes, the training loop) and, in `stages/`, the only code that knows a run directory."""

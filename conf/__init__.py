# Makes the configs importable as the package `lightning_ewc.conf`, so Hydra finds them (pkg://lightning_ewc.conf)
# in editable and non-editable installs alike.

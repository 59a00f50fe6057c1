"""The bundled experiment configs, one file per experiment.

They ship with the package: `--config=<name>[:arg]` (e.g. `--config=vit_cifar10:smoke`)
loads `<name>.py` from here when no file of that name exists. In the repository,
`configs/` is a link to this folder, so `--config=configs/<name>.py` is the same file.
"""

"""keras_vit.cli: the `vitcli` command line."""

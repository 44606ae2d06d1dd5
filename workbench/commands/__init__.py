"""One module per `workbench` subcommand; each exposes `register(subparsers)`."""

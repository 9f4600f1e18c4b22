"""The `gemoe` command line: the Typer application and one module per subcommand."""

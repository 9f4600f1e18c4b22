"""Run the command line as `python -m gemoe_cli`."""

from gemoe_cli.cli.app import main

if __name__ == "__main__":
    main()

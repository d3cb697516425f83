"""`python -m vitfold ...`: the command line (the same as the `vitfold` script)."""

from vitfold.cli import main

main(prog_name="vitfold")

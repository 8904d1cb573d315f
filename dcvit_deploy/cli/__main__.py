"""``python -m dcvit_deploy.cli``: the console script."""

from dcvit_deploy.cli import main

main()

"""Run dcvit-deploy from a checkout without installing: ``python cli.py --help``."""

from dcvit_deploy.cli import main

if __name__ == "__main__":
    main()

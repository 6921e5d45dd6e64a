"""``python -m kiln`` (also what ``torchrun -m kiln`` runs)."""

from kiln.cli.main import main

if __name__ == "__main__":
    main()

"""Training algorithms (mixup, cutmix, label smoothing, EMA, ...), usable without the trainer.

Each is a pure function or small object first (DESIGN.md rule 7): randomness comes from an
explicit ``torch.Generator``, global RNG state is never touched, and each is tested alone.
Thin adapters elsewhere wire them into the trainer. Import from the submodules, e.g.
``from kiln.algorithms.mixing import mixup_batch``.
"""

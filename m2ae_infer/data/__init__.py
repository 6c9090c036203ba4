"""Training and evaluation data: synthetic local motion blur on real photographs (see ``synth``)."""

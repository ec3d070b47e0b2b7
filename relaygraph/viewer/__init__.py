"""Viewers of stored trajectories: the terminal (:mod:`.terminal`) and one HTML page
(:mod:`.html`), both reading the numbers the run recorded (:mod:`.summary`)."""

"""Dataset preparation.

`synthetic.py` writes the small synthetic datasets shipped with the repository (CPT corpus, SFT
chats, RL prompts, eval task data) from a seed, so every stage runs offline and a tiny model can
learn them on a CPU in minutes.
"""

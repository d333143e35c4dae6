"""Training: embedded corpora, user data and the byte / BPE tokenizers (data.py), the training
loop (loop.py), the objectives (tasks.py), the image judge (judge.py) and the command-line
entry points (cli.py)."""

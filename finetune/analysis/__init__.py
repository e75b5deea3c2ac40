"""Questions about a config or a model, answered as plain data (the CLI renders it).

- ``freeze_report``: what is frozen, what trains, what the optimizer sees;
- ``gradcheck``: are the gradients right (``inspect-grads``);
- ``lr_find``: the learning-rate range test;
- ``runs``: run directories side by side (``runs``, ``runs --compare``).
"""

"""Networks: what finetune knows of each architecture, weights, freezing and the fast path.

- ``arch``: one description per architecture family (stages, head, depth order, report rows);
- ``weights``: torchvision weights (cache first, then download), local state-dict files, the new head;
- ``freeze``: freeze rules -> a per-parameter plan, BatchNorm modes;
- ``fastpath``: the frozen prefix without autograd, its feature cache, channels-last and bf16;
- ``build``: config -> a ready model (weights, head, freeze plan, BatchNorm modes).
"""

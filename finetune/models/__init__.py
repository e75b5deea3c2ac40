"""Networks: what finetune knows of each architecture, weights, freezing and the fast path.

- ``arch``: one description per architecture family (stages, head, depth order, report rows) and one line per model
  (torchvision's weights metadata and preprocessing), without torch;
- ``catalog``: the supported models as rows for ``finetune models``, without torch;
- ``weights``: torchvision weights (cache first, then download), local state-dict files, the new head;
- ``freeze``: freeze rules -> a per-parameter plan, the modes of BatchNorm, dropout and stochastic depth;
- ``fastpath``: the frozen prefix without autograd, its feature cache, the memory format, bf16;
- ``build``: config -> a ready model (weights, head, freeze plan, BatchNorm modes).
"""

"""finetune: fine-tune a pretrained torchvision ResNet on your own images, on a CPU."""

__version__ = "0.1.0"

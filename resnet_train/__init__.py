"""resnet-train: the ResNet family trained from one YAML file, from a laptop CPU to many nodes."""

__version__ = "0.1.0"

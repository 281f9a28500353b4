"""BNext training and evaluation on ImageNet-layout data."""

"""Analysis figures for BNext: loss landscapes, training curves, binary feature maps, accuracy vs OPs."""

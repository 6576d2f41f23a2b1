"""Model building blocks: ViT encoder and the MAE decoder."""

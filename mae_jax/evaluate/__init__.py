"""Downstream evaluation of pretrained encoders: checkpoint loading (`encoder_init`), k-NN (`knn`)."""

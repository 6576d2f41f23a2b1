"""Downstream tasks on a pretrained encoder: fine-tuning and linear probing (trainables sharing
`classifier`), layer-wise lr decay, mixup / cutmix, and the pretraining-helps example."""

"""TorchRec DLRM trained incrementally on the training-examples stream, with and without LUM features."""

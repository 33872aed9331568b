"""Face-recognition training on Ray Train: ``train_fr(TrainConfig) -> TrainResult``."""

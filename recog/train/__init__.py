"""Face-recognition training on Ray Train: ``recog.train.trainer.run(TrainFRJob) -> TrainResult``."""

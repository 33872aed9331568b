"""Ingest of real photos/videos: decoding, face detection and cropping."""
